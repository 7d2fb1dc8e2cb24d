"""sd_ingest: raw captioned images -> dataset version -> quality gate -> dataset Asset event.

plan splits the source into units of `dataset.unit_size` inputs; ingest_unit runs once per
unit (dynamic task mapping), each checking its images on all of its worker's cores;
commit merges the units, drops duplicates across them and publishes the version;
quality_gate accepts it. `sd-pipeline ingest` does the same in one process, with the same
version id.

With `dataset.schedule` it runs by itself and `{{ ds }}` in the source URI becomes the run's
date, so `airflow backfill create --dag-id sd_ingest --from-date … --to-date …` builds the
versions of past days; rerunning a built day changes nothing.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from sd_pipeline.airflow import ingest_tasks, tasks
from sd_pipeline.airflow.settings import (
    DEFAULT_ARGS,
    dataset_asset,
    pipeline_config,
)

config = pipeline_config()
dataset = dataset_asset(config)

with DAG(
    dag_id="sd_ingest",
    description=f"Ingest {config.dataset.source.uri} into dataset {config.dataset.name}",
    schedule=config.dataset.schedule,  # e.g. @daily; backfill past days with `airflow backfill create`
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # days publish in order, so LATEST is always the newest day
    default_args={**DEFAULT_ARGS, "owner": "data-engineering"},
    tags=["sd-pipeline", "data-engineering", "data"],
    doc_md=__doc__,
):

    @task(task_id="plan")
    def plan() -> list[dict]:
        return ingest_tasks.plan()

    @task(task_id="ingest_unit", map_index_template="{{ " + ingest_tasks.UNIT_LABEL + " }}")
    def ingest_unit(unit: dict) -> dict:
        return ingest_tasks.ingest_unit(unit)

    @task(task_id="commit")
    def commit(units: list[dict]) -> dict:
        return ingest_tasks.commit(list(units))

    @task(task_id="quality_gate", outlets=[dataset])
    def quality_gate(ingested: dict) -> dict:
        return tasks.validate(ingested, dataset)

    quality_gate(commit(ingest_unit.expand(unit=plan())))
