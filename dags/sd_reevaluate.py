"""sd_reevaluate: evaluate a registered model version again, on another prompt set.

Trigger it with the form: a model version (number or alias) and a prompt set (a shipped
name or a YAML file). The evaluation runs where sd_train's evaluations run (a subprocess,
or a GPU pod per compute.evaluate) into runs/<run_id>/reevaluations/<set>/; its metrics go
to that version's MLflow run as reeval.<set>.<metric>, beside the original ones.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from sd_pipeline.airflow import tasks
from sd_pipeline.airflow.params import reevaluate_params
from sd_pipeline.airflow.settings import DEFAULT_ARGS, pipeline_config

config = pipeline_config()

with DAG(
    dag_id="sd_reevaluate",
    description=f"Re-evaluate a version of {config.registry.model_name} on another prompt set",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=reevaluate_params(config),
    default_args={**DEFAULT_ARGS, "owner": "modelling"},
    tags=["sd-pipeline", "modelling", "evaluation"],
    doc_md=__doc__,
):

    @task(task_id="resolve_version")
    def resolve_version() -> dict:
        return tasks.reevaluation_prepare()

    @task(task_id="log_metrics")
    def log_metrics(prepared: dict, result: dict) -> dict:
        return tasks.reevaluation_log(prepared, result)

    prepared = resolve_version()
    log_metrics(prepared, tasks.heavy_stage("reevaluate", config, prepared))
