"""The pipeline's stages, each one function of small JSON-able arguments.

Airflow tasks, the ``sd-pipeline`` CLI and GPU pods all call these. Each returns a small
dict (ids, URIs, counts, metrics) and is idempotent: rerunning a stage for the same inputs
finds its published result instead of redoing or duplicating it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from sd_pipeline.config import PipelineConfig, load_config, parse_config
from sd_pipeline.home import EmbeddedHome
from sd_pipeline.ingest.versions import latest_key, resolve_version, version_prefix
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline")


class QualityGateFailed(RuntimeError):
    """A dataset version failed its quality gate; the message names the failed expectations."""


def store_for(config: PipelineConfig) -> Store:
    return Store.from_uri(config.storage.root, config.storage.endpoint_url)


def load_config_uri(uri: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a config from a path, ``file://`` URI or a stored run's ``s3://…/config.json``."""
    if uri.startswith("s3://"):
        bucket_key = uri[len("s3://"):]
        bucket, _, key = bucket_key.partition("/")
        store = Store.from_uri(f"s3://{bucket}")
        return parse_config(store.get_json(key), overrides, origin=uri)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return load_config(path, overrides)


# -- ingest and gate -----------------------------------------------------------------


def ingest(config: PipelineConfig) -> dict[str, Any]:
    from sd_pipeline.ingest.build import ingest as build_version

    return build_version(config)


def validate(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Run the quality gate on a committed version; on success it becomes ``LATEST``.

    A failed gate marks the version rejected, leaves ``LATEST`` untouched and raises
    :class:`QualityGateFailed` with the human summary.
    """
    from sd_pipeline.quality.version_gate import gate_version

    ds = config.dataset
    store = store_for(config)
    prefix = version_prefix(ds.name, version)
    if not store.is_committed(prefix):
        raise FileNotFoundError(f"dataset version {store.uri(prefix)} is not committed; ingest first")
    verdict, summary = gate_version(config, store, version)
    if not verdict["passed"]:
        store.put_json(f"{prefix}/REJECTED", verdict)
        raise QualityGateFailed(
            f"dataset {ds.name} version {version} failed its quality gate; LATEST is unchanged.\n"
            f"{summary}\nreport: {verdict.get('report_uri')}"
        )
    if store.exists(f"{prefix}/REJECTED"):  # passed now, e.g. after a recorded threshold change
        store.delete_prefix(f"{prefix}/REJECTED")
    store.write_pointer(latest_key(ds.name), version)
    log.info("dataset %s version %s passed the gate and is now LATEST", ds.name, version)
    return verdict


# -- runs ------------------------------------------------------------------------------


def prepare_run(
    config: PipelineConfig, dataset_version: str | None = None, extra_tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Pin the dataset version, derive the run id from the inputs and store the config.

    The run id is a hash of the resolved config (dataset version included), so the same
    inputs give the same run: a retry resumes it, a duplicate trigger finds it done.
    """
    store = store_for(config)
    wanted = dataset_version or config.dataset.version
    version = resolve_version(store, config.dataset.name, wanted)
    resolved = config.model_copy(update={"dataset": config.dataset.model_copy(update={"version": version})})
    run_id = run_id_for(resolved)
    config_key = f"runs/{run_id}/config.json"
    store.put_json(config_key, json.loads(resolved.to_json()))
    if extra_tags:
        store.put_json(f"runs/{run_id}/trigger.json", extra_tags)
    already = store.is_committed(f"runs/{run_id}/final")
    log.info("run %s on %s/%s%s", run_id, resolved.dataset.name, version,
             " (already trained: will reuse)" if already else "")
    return {"run_id": run_id, "config_uri": store.uri(config_key), "dataset": resolved.dataset.name,
            "dataset_version": version, "already_trained": already}


def train(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    from sd_pipeline.train.trainer import train as run_training

    return run_training(config, run_id, config.dataset.version)


def evaluate(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    from sd_pipeline.evaluate.evaluate import evaluate as run_evaluation

    return run_evaluation(config, run_id, config.dataset.version)


def register(config: PipelineConfig, run_id: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the run to MLflow and register its model; idempotent per run id."""
    from sd_pipeline.models.base import resolve_base_model
    from sd_pipeline.registry.tracking import log_and_register

    store = store_for(config)
    home = EmbeddedHome.from_env()
    final = f"runs/{run_id}/final"
    if not store.is_committed(final):
        raise FileNotFoundError(f"{store.uri(final)} is not committed; train run {run_id} first")
    metrics = store.get_json(f"runs/{run_id}/eval/metrics.json")
    train_meta = store.get_json(f"{final}/metadata.json")
    with tempfile.TemporaryDirectory(prefix=f"sd-register-{run_id}-") as tmp:
        work = Path(tmp)
        model_dir = store.download_dir(final, work / "model")
        (model_dir / "_COMMITTED").unlink(missing_ok=True)
        grid = store.get_file(f"runs/{run_id}/eval/grid.png", work / "eval" / "grid.png")
        metrics_file = store.get_file(f"runs/{run_id}/eval/metrics.json", work / "eval" / "metrics.json")
        ds_prefix = version_prefix(config.dataset.name, config.dataset.version)
        artifacts = {"eval/grid.png": grid, "eval/metrics.json": metrics_file}
        for name in ("ingest.json", "quality/verdict.json"):
            if store.exists(f"{ds_prefix}/{name}"):
                artifacts[f"dataset/{name}"] = store.get_file(f"{ds_prefix}/{name}", work / "dataset" / name)
        numeric = {k: float(v) for k, v in _flat(metrics.get("metrics", metrics)).items()
                   if isinstance(v, (int, float))}
        numeric.update({f"train.{k}": float(train_meta[k]) for k in ("seconds", "samples_per_s", "final_loss")
                        if isinstance(train_meta.get(k), (int, float))})
        result = log_and_register(
            config.registry,
            run_id=run_id,
            params=json.loads(config.to_json()),
            metrics=numeric,
            artifacts=artifacts,
            model_dir=model_dir,
            base_model_dir=resolve_base_model(config.model.base, home.work_dir / "base-models"),
            tags={"sd_pipeline.run_id": run_id, "dataset.name": config.dataset.name,
                  "dataset.version": config.dataset.version, "train.method": config.train.method,
                  **(tags or {})},
            dataset={"name": config.dataset.name, "version": config.dataset.version,
                     "uri": store.uri(ds_prefix)},
        )
    summary = {**result, "run_id": run_id, "metrics": numeric,
               "grid_uri": store.uri(f"runs/{run_id}/eval/grid.png")}
    store.put_json(f"runs/{run_id}/registered.json", summary)
    store.write_pointer(f"pipelines/{config.name}/LAST_RUN", run_id)
    return summary


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_id_for(config: PipelineConfig) -> str:
    """Same resolved config (dataset version included), same run id."""
    return f"{config.name}-{config.fingerprint()[:12]}"
