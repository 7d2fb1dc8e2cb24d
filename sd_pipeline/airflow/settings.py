"""Parse-time settings of the DAGs: which pipeline config, which Asset, default args.

Reading the config here costs a YAML parse and a pydantic validation (milliseconds);
nothing heavy is imported.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from sd_pipeline.airflow.alerts import PipelineAlerts
from sd_pipeline.airflow.errors import TransientOnly
from sd_pipeline.config import PipelineConfig, load_config
from sd_pipeline.home import repo_root

if TYPE_CHECKING:
    from airflow.sdk.execution_time.hitl import HITLUser


def config_path() -> str:
    """``$SD_PIPELINE_CONFIG``, else the demo config of this checkout."""
    return os.environ.get("SD_PIPELINE_CONFIG") or str(repo_root() / "configs" / "demo.yaml")


@lru_cache(maxsize=4)
def _load(path: str) -> PipelineConfig:
    return load_config(path)


def pipeline_config() -> PipelineConfig:
    return _load(config_path())


def dataset_asset_uri(config: PipelineConfig) -> str:
    """Where the dataset's versions live: the Asset a new accepted version updates."""
    return f"{config.storage.root.rstrip('/')}/datasets/{config.dataset.name}"


def dataset_asset_name(config: PipelineConfig) -> str:
    return f"sd_dataset_{config.dataset.name}"


def dataset_asset(config: PipelineConfig) -> Any:
    """The Asset that ``sd_ingest`` updates when a version passes its gate."""
    from airflow.sdk import Asset

    return Asset(name=dataset_asset_name(config), uri=dataset_asset_uri(config))


def approver_users(config: PipelineConfig) -> list[HITLUser] | None:
    """``registry.approvers`` as the HITL request's assigned users (None = anyone may answer).

    Airflow checks a responder's auth-manager user id against these ids; the simple auth
    manager's (and most SSO managers') id is the user name, so each name is both.
    """
    return [cast("HITLUser", {"id": name, "name": name}) for name in config.registry.approvers] or None


def train_schedule(config: PipelineConfig, dataset: Any) -> Any:
    """``sd_train``'s schedule: each new dataset version, and ``train.schedule`` if set.

    With a cron, whichever comes first starts a run; a run whose inputs already made a
    registered model skips itself (tasks.prepare), so the two never train the same thing twice.
    """
    if not config.train.schedule:
        return [dataset]
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(config.train.schedule, timezone="UTC"), assets=[dataset]
    )


# Who owns a DAG, by the role that answers for it: the owner and a tag of every DAG.
ROLES = ("data-engineering", "modelling", "release")

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    # Transient failures (S3 throttling, 5xx, connection errors, a pod that found no node) are
    # retried after 1-2, 2-4, 4-8 min (capped at 30); permanent ones fail at once (errors.TransientOnly).
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "retry_policy": TransientOnly(),
    # Alerts per the config's `alerts` section, read when a task fails (alerts.PipelineAlerts).
    "on_failure_callback": [PipelineAlerts()],
}
