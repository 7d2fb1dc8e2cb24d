"""sd_train: dataset version -> train -> evaluate -> register in MLflow -> promote to champion.

Runs when a new dataset version passes its gate, on `train.schedule` (cron) if set, or by
hand with the trigger form. A run whose inputs already made a registered model skips itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Param, task

from sd_pipeline.airflow import tasks
from sd_pipeline.airflow.params import train_params
from sd_pipeline.airflow.settings import (
    DEFAULT_ARGS,
    approver_users,
    dataset_asset,
    pipeline_config,
    train_schedule,
)

config = pipeline_config()
dataset = dataset_asset(config)

with DAG(
    dag_id="sd_train",
    description=f"Fine-tune {config.train.method} on dataset {config.dataset.name}",
    schedule=train_schedule(config, dataset),  # new dataset versions, and train.schedule if set
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=train_params(config),
    # Each stage's wall time goes to the run's monitoring summary (logged by register).
    default_args={**DEFAULT_ARGS, "owner": "modelling", "on_success_callback": [tasks.record_duration]},
    tags=["sd-pipeline", "modelling", "training"],
    doc_md=__doc__,
):

    @task(task_id="prepare_run")
    def prepare_run() -> dict:
        return tasks.prepare()

    @task(task_id="register")
    def register(run: dict, evaluated: dict) -> dict:
        return tasks.register(run)

    run = prepare_run()
    # train and evaluate run the same command as a local subprocess or in a GPU pod, as
    # compute.<stage>.backend says; this file is the same for both.
    # The latent cache is its own step: computed once per (dataset versions, base model,
    # resolution, buckets), so the training pod loads neither the VAE nor the text encoders.
    cached = tasks.heavy_stage("cache", config, run)
    trained = tasks.heavy_stage("train", config, run, after=cached)
    evaluated = tasks.heavy_stage("evaluate", config, run, after=trained)
    registered = register(run, evaluated)

    # -- champion and challenger: promote when the challenger wins, after a person approves
    # if the form's require_approval says so; the promote task records every decision.
    @task.branch(task_id="promotion_check")
    def promotion_check(run: dict, registered: dict) -> list[str]:
        return tasks.promotion_check(run)

    @task(task_id=tasks.PROMOTE_TASK, trigger_rule="none_failed_min_one_success")
    def promote(run: dict) -> dict:
        return tasks.promote(run)

    check = promotion_check(run, registered)
    approve = HITLOperator(
        task_id=tasks.APPROVAL_TASK,
        subject=tasks.APPROVAL_SUBJECT,
        body=tasks.APPROVAL_BODY,
        options=[tasks.APPROVE, tasks.REJECT],
        defaults=[tasks.REJECT],  # taken when nobody answers in time
        params={"comment": Param("", type="string", title="Comment")},
        response_timeout=timedelta(days=7),
        assigned_users=approver_users(config),  # registry.approvers; promote refuses anyone else
    )
    promoted = promote(run)
    check >> approve >> promoted
    check >> promoted
