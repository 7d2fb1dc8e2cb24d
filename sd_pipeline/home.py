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
