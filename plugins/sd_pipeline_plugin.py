"""Airflow plugin: task links to sd-pipeline outputs, and a read-only view of its reports."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from sd_pipeline.airflow.links import ALL_LINKS, APP_PREFIX
from sd_pipeline.airflow.store_app import create_app


class SdPipelinePlugin(AirflowPlugin):
    name = "sd_pipeline"
    global_operator_extra_links = ALL_LINKS
    fastapi_apps = [{"app": create_app(), "url_prefix": APP_PREFIX, "name": "sd-pipeline reports"}]
