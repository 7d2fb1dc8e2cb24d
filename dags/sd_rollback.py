"""sd_rollback: point the champion alias back at the previous champion, recording who and why.

Trigger it by hand with the form: a reason (required), optionally who asks and which
version to return to. The decision is written on both model versions in MLflow.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from sd_pipeline.airflow import tasks
from sd_pipeline.airflow.params import rollback_params
from sd_pipeline.airflow.settings import DEFAULT_ARGS, pipeline_config

config = pipeline_config()

with DAG(
    dag_id="sd_rollback",
    description=f"Roll {config.registry.model_name}@{config.registry.champion_alias} back",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=rollback_params(),
    default_args={**DEFAULT_ARGS, "owner": "release"},  # the champion is what is released
    tags=["sd-pipeline", "release", "registry"],
    doc_md=__doc__,
):

    @task(task_id="rollback")
    def rollback() -> dict:
        return tasks.rollback()

    rollback()
