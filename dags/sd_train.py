"""sd_train: dataset version -> train -> evaluate -> register in MLflow.

Runs when a new dataset version passes its gate, or by hand with the trigger form.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Asset, task

from sd_pipeline.airflow import tasks
from sd_pipeline.airflow.params import train_params
from sd_pipeline.airflow.settings import (
    DEFAULT_ARGS,
    dataset_asset_name,
    dataset_asset_uri,
    pipeline_config,
)

config = pipeline_config()
dataset = Asset(name=dataset_asset_name(config), uri=dataset_asset_uri(config))

with DAG(
    dag_id="sd_train",
    description=f"Fine-tune {config.train.method} on dataset {config.dataset.name}",
    schedule=[dataset],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=train_params(config),
    default_args={**DEFAULT_ARGS, "owner": "modelling"},
    tags=["sd-pipeline", "training"],
    doc_md=__doc__,
):

    @task(task_id="prepare_run")
    def prepare_run() -> dict:
        return tasks.prepare()

    @task(task_id="train")
    def train(run: dict) -> dict:
        return tasks.run_stage("train", run)

    @task(task_id="evaluate")
    def evaluate(run: dict, trained: dict) -> dict:
        return tasks.run_stage("evaluate", run)

    @task(task_id="register")
    def register(run: dict, evaluated: dict) -> dict:
        return tasks.register(run)

    run = prepare_run()
    register(run, evaluate(run, train(run)))
