"""sd_rebuild_cache: recompute the latent cache of a dataset selection and the base model.

For a cache built with a broken encoder, or after the base model was replaced in place.
The next training run on the same inputs then reads the fresh cache. Trigger it with the
form: which dataset versions ('latest', ids, 'last:N', 'window:Nd').
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from sd_pipeline.airflow import tasks
from sd_pipeline.airflow.params import train_params
from sd_pipeline.airflow.settings import DEFAULT_ARGS, pipeline_config

config = pipeline_config()

with DAG(
    dag_id="sd_rebuild_cache",
    description=f"Recompute the latent cache of dataset {config.dataset.name} for {config.model.base}",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={"dataset_version": train_params(config)["dataset_version"]},
    default_args={**DEFAULT_ARGS, "owner": "modelling"},
    tags=["sd-pipeline", "modelling", "training", "operations"],
    doc_md=__doc__,
):

    @task(task_id="prepare_run")
    def prepare_run(params: dict) -> dict:
        # Not tasks.prepare(): a run already trained on these inputs is no reason to skip here.
        from sd_pipeline import stages
        from sd_pipeline.airflow.settings import config_path

        overrides = {"dataset.version": params["dataset_version"]}
        return stages.prepare_run(stages.load_config_uri(config_path(), overrides))

    @task(task_id="invalidate_cache")
    def invalidate_cache(run: dict) -> dict:
        from sd_pipeline import stages

        return stages.invalidate_cache(stages.load_config_uri(run["config_uri"]))

    run = prepare_run()  # type: ignore[call-arg]  # Airflow passes params
    # The same heavy step as in sd_train (a subprocess, or a GPU pod per compute.cache).
    tasks.heavy_stage("cache", config, run, after=invalidate_cache(run))
