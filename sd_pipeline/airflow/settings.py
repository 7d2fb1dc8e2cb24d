"""Parse-time settings of the DAGs: which pipeline config, which Asset, default args.

Reading the config here costs a YAML parse and a pydantic validation (milliseconds);
nothing heavy is imported.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from typing import Any

from sd_pipeline.config import PipelineConfig, load_config
from sd_pipeline.home import repo_root


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


DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 0,
    "retry_delay": timedelta(seconds=30),
}
