"""Links from Airflow task instances to what they produced: quality report, data card,
sample grid, MLflow run and registered model version.

Tasks push each link as an XCom (``sd_link_<name>``) while they run; the plugin registers
one global operator link per name, which the API server resolves from that XCom. A task
that produced nothing of a kind simply has no such XCom, and the UI shows no link.
Store objects are served by the plugin's read-only app (``/sd-pipeline/store/<key>``),
since browsers will not open ``file://`` or ``s3://`` from a web page.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

LINK_NAMES: dict[str, str] = {
    "quality_report": "Quality report",
    "data_docs": "GX Data Docs",
    "datacard": "Data card",
    "sample_grid": "Sample grid",
    "mlflow_run": "MLflow run",
    "model_version": "Registered model",
}
APP_PREFIX = "/sd-pipeline"


def xcom_key(name: str) -> str:
    return f"sd_link_{name}"


def store_url(root_uri: str, uri: str | None) -> str | None:
    """The plugin-app URL of a store object, or None when it is not under this store."""
    if not uri:
        return None
    root = root_uri.rstrip("/") + "/"
    if not uri.startswith(root):
        return None
    base = os.environ.get("SD_PIPELINE_AIRFLOW_URL", "").rstrip("/")
    return f"{base}{APP_PREFIX}/store/{quote(uri[len(root) :])}"


def mlflow_ui() -> str:
    return os.environ.get("SD_PIPELINE_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(name: str, version: str) -> str:
    return f"{mlflow_ui()}/#/models/{quote(name)}/versions/{version}"


def push_links(links: dict[str, str | None]) -> None:
    """Record this task instance's links (inside a running task)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    for name, url in links.items():
        if url:
            if name not in LINK_NAMES:
                raise KeyError(f"unknown link {name!r}; known: {sorted(LINK_NAMES)}")
            ti.xcom_push(key=xcom_key(name), value=url)


class _PushedLink(BaseOperatorLink):
    """A link whose URL the task pushed as XCom ``sd_link_<key>``."""

    key: ClassVar[str]

    @property
    def name(self) -> str:
        return LINK_NAMES[self.key]

    @property
    def xcom_key(self) -> str:
        return xcom_key(self.key)

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return read_link(self.xcom_key, ti_key)


class QualityReportLink(_PushedLink):
    key = "quality_report"


class DataDocsLink(_PushedLink):
    key = "data_docs"


class DataCardLink(_PushedLink):
    key = "datacard"


class SampleGridLink(_PushedLink):
    key = "sample_grid"


class MlflowRunLink(_PushedLink):
    key = "mlflow_run"


class ModelVersionLink(_PushedLink):
    key = "model_version"


ALL_LINKS: list[BaseOperatorLink] = [
    QualityReportLink(),
    DataDocsLink(),
    DataCardLink(),
    SampleGridLink(),
    MlflowRunLink(),
    ModelVersionLink(),
]


def read_link(key: str, ti_key: Any) -> str:
    """Read a pushed link from the metadata DB (runs in the API server)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=key,
                run_id=ti_key.run_id,
                dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    if not row:
        return ""
    value = XComModel.deserialize_value(row) if hasattr(XComModel, "deserialize_value") else row[0]
    return value if isinstance(value, str) else str(value)
