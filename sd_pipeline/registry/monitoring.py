"""What a run cost: stage durations, GPU-hours, throughput and dataset size, in one summary.

Each ``sd_train`` task records its wall time under ``runs/<run_id>/timings/<task>.json`` when
it succeeds (``record_stage_time``, an Airflow success callback that sees local subprocesses
and GPU pods alike). The register stage gathers those with what the stages report themselves
(the trainer's seconds and samples/s, the evaluation's seconds, the dataset's counts) into
``monitoring.json``, logged to the run's MLflow run as an artifact and as ``monitoring.*``
metrics. A stage run outside Airflow has no timing file; its own seconds stand in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.monitoring")

STAGES = ("prepare_run", "cache", "train", "evaluate", "register")


def timings_prefix(run_id: str) -> str:
    return f"runs/{run_id}/timings"


def record_stage_time(store: Store, run_id: str, stage: str, started: datetime, ended: datetime,
                      try_number: int = 1) -> dict[str, Any]:
    """Write one stage's wall time (its last, successful try) for the run's summary."""
    record = {"stage": stage, "seconds": round((ended - started).total_seconds(), 3),
              "started": started.isoformat(timespec="seconds"), "ended": ended.isoformat(timespec="seconds"),
              "try_number": try_number}
    store.put_json(f"{timings_prefix(run_id)}/{stage}.json", record)
    return record


def _recorded(store: Store, run_id: str) -> dict[str, float]:
    out = {}
    for key in store.list(timings_prefix(run_id)):
        if key.endswith(".json"):
            record = store.get_json(key)
            out[str(record["stage"])] = float(record["seconds"])
    return out


def _gpus(train: Mapping[str, Any], compute: Any) -> int:
    """GPUs the training ran on: 0 on CPU; else what the trainer recorded, else the pod's."""
    device = str(train.get("device") or "cpu")
    if not device.startswith("cuda"):
        return 0
    for key in ("gpus", "processes", "world_size", "num_processes"):  # one process per GPU
        if isinstance(train.get(key), int) and train[key] > 0:
            return int(train[key])
    return int(compute.train.gpus) if compute.backend_for("train") == "kubernetes" else 1


def run_summary(
    store: Store,
    run_id: str,
    *,
    compute: Any,
    train: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    dataset: Mapping[str, Any],
    register_seconds: float | None = None,
) -> dict[str, Any]:
    """The run's monitoring summary (JSON-able); ``compute`` is the config's ``compute`` section."""
    durations = _recorded(store, run_id)
    sources = {stage: "airflow task" for stage in durations}
    for stage, seconds in (("train", train.get("seconds")), ("evaluate", evaluation.get("seconds")),
                           ("register", register_seconds)):
        if stage not in durations and isinstance(seconds, (int, float)):
            durations[stage], sources[stage] = float(seconds), "stage's own measure"
    gpus = _gpus(train, compute)
    train_seconds = durations.get("train", float(train.get("seconds") or 0.0))
    ingest = dataset.get("ingest") or {}
    splits = ingest.get("splits") or {}
    return {
        "run_id": run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "durations_s": {s: round(durations[s], 3) for s in (*STAGES, *sorted(durations)) if s in durations},
        "duration_sources": sources,
        "total_s": round(sum(durations.values()), 3),
        "device": str(train.get("device") or "unknown"),
        "gpus": gpus,
        "gpu_hours": round(gpus * train_seconds / 3600.0, 6),
        "train_seconds": round(train_seconds, 3),
        "trainer_seconds": train.get("seconds"),
        "samples_per_s": train.get("samples_per_s"),
        "steady_samples_per_s": train.get("steady_samples_per_s"),
        "steps": train.get("steps"),
        "dataset": {
            "name": dataset.get("name"),
            "version": dataset.get("version"),
            "samples": ingest.get("accepted"),
            "train_samples": splits.get("train", (train.get("dataset") or {}).get("train_samples")),
            "holdout_samples": splits.get("holdout"),
            "quarantined": ingest.get("quarantined"),
            "shards": ingest.get("shards"),
        },
    }


def mlflow_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``monitoring.*`` metrics of the summary: durations, GPU-hours, throughput, dataset size."""
    metrics = {f"monitoring.duration_s.{k}": float(v) for k, v in summary["durations_s"].items()}
    metrics["monitoring.total_s"] = float(summary["total_s"])
    metrics["monitoring.gpu_hours"] = float(summary["gpu_hours"])
    metrics["monitoring.gpus"] = float(summary["gpus"])
    if isinstance(summary.get("samples_per_s"), (int, float)):
        metrics["monitoring.samples_per_s"] = float(summary["samples_per_s"])
    for key in ("samples", "train_samples", "holdout_samples", "shards"):
        value = (summary.get("dataset") or {}).get(key)
        if isinstance(value, (int, float)):
            metrics[f"monitoring.dataset_{key}"] = float(value)
    return metrics


def summary_line(summary: Mapping[str, Any]) -> str:
    durations = ", ".join(f"{k} {v:.1f}s" for k, v in summary["durations_s"].items())
    rate = summary.get("samples_per_s")
    return (f"run {summary['run_id']}: {durations}; {summary['gpu_hours']:.3f} GPU-hours on "
            f"{summary['gpus']} GPU(s) ({summary['device']}); "
            + (f"{rate:.1f} samples/s; " if isinstance(rate, (int, float)) else "")
            + f"dataset {summary['dataset'].get('samples')} samples")
