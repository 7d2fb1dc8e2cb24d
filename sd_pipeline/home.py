"""The embedded home: where a one-machine install keeps Airflow, MLflow, the store and data.

``SD_PIPELINE_HOME`` (default ``./.sd-pipeline``) holds everything the embedded default
needs, so a checkout runs with no services, no Docker and no network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedHome:
    """Paths of the embedded default, all under one root folder."""

    root: Path

    @classmethod
    def from_env(cls) -> EmbeddedHome:
        return cls(Path(os.environ.get("SD_PIPELINE_HOME", ".sd-pipeline")).resolve())

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def store_root(self) -> Path:
        return self.root / "store"

    @property
    def raw_data(self) -> Path:
        return self.root / "raw" / "shapes"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "tiny-sd"

    @property
    def base_model_sdxl(self) -> Path:
        """Where ``sd-pipeline tiny-model --kind sdxl`` builds the tiny SDXL (the demo stays on SD 1.x)."""
        return self.root / "models" / "tiny-sdxl"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def work_dir(self) -> Path:
        """Scratch space for local compute (model caches, run temp files)."""
        return self.root / "work"


def repo_root() -> Path:
    """The checkout this package runs from (dags/, plugins/, configs/ live there)."""
    return Path(__file__).resolve().parent.parent


def airflow_env(home: EmbeddedHome) -> dict[str, str]:
    """Environment for Airflow on the embedded home: SQLite, LocalExecutor, our DAGs."""
    root = repo_root()
    return {
        "AIRFLOW_HOME": str(home.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "SD_PIPELINE_HOME": str(home.root),
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": home.mlflow_tracking_uri,
    }
