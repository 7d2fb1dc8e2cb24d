"""What a training run reports while it runs: MLflow metrics every N steps, a progress bar.

Monitoring never stops training: an MLflow server that is down costs a warning, not the run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from sd_pipeline.config import RegistryConfig

log = logging.getLogger("sd_pipeline.train")


def memory_bytes(device: Any) -> int:
    """Peak GPU memory allocated on CUDA, else this process's peak resident memory."""
    import resource

    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepLogger:
    """Metrics to the pipeline run's MLflow run (found by its run-id tag) and a progress bar."""

    def __init__(self, registry: RegistryConfig, run_id: str, total: int, start: int, enabled: bool) -> None:
        self.client: Any = None
        self.mlflow_run_id: str | None = None
        self._warned = False
        if enabled:
            try:
                from sd_pipeline.registry.tracking import tracking_run

                self.client, self.mlflow_run_id = tracking_run(registry, run_id)
            except Exception as err:  # noqa: BLE001 - monitoring must not stop training
                self._warn(err)
        self.bar: Any = None
        if sys.stderr.isatty() and not os.environ.get("SD_PIPELINE_NO_PROGRESS"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            log.warning("MLflow step logging is off for this run: %s: %s", type(err).__name__, err)
            self._warned = True
        self.client = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None or self.mlflow_run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(
                self.mlflow_run_id,
                metrics=[Metric(f"train.{k}", float(v), now, step) for k, v in metrics.items()],
            )
        except Exception as err:  # noqa: BLE001
            self._warn(err)

    def log_image(self, step: int, png: bytes) -> None:
        if self.client is None or self.mlflow_run_id is None:
            return
        import tempfile
        from pathlib import Path

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"step-{step:07d}.png"
                path.write_bytes(png)
                self.client.log_artifact(self.mlflow_run_id, str(path), "validation")
        except Exception as err:  # noqa: BLE001
            self._warn(err)

    def advance(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
