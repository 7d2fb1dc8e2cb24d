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
from sd_pipeline.ingest.versions import latest_key, version_prefix
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline")


class QualityGateFailed(RuntimeError):
    """A dataset version failed its quality gate; the message names the failed expectations."""


def store_for(config: PipelineConfig) -> Store:
    return Store.from_uri(config.storage.root, config.storage.endpoint_url)


def load_config_uri(uri: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a config from a path, ``file://`` URI or a stored run's ``s3://…/config.json``."""
    if uri.startswith("s3://"):
        bucket_key = uri[len("s3://") :]
        bucket, _, key = bucket_key.partition("/")
        store = Store.from_uri(f"s3://{bucket}")
        return parse_config(store.get_json(key), overrides, origin=uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return load_config(path, overrides)


# -- ingest and gate -----------------------------------------------------------------


DATE_PLACEHOLDERS = ("{{ ds }}", "{{ds}}", "{ds}")


def for_date(config: PipelineConfig, ds: str | None) -> PipelineConfig:
    """The config with ``{{ ds }}`` in the source URI replaced by the run's date."""
    uri = config.dataset.source.uri
    if not any(p in uri for p in DATE_PLACEHOLDERS):
        return config
    if ds is None:
        raise ValueError(f"dataset.source.uri {uri!r} needs a date ({{{{ ds }}}}): pass one (--date)")
    for p in DATE_PLACEHOLDERS:
        uri = uri.replace(p, ds)
    source = config.dataset.source.model_copy(update={"uri": uri})
    return config.model_copy(update={"dataset": config.dataset.model_copy(update={"source": source})})


def ingest(config: PipelineConfig, ds: str | None = None) -> dict[str, Any]:
    """Ingest the source (for date ``ds`` when the source URI is templated with it)."""
    from sd_pipeline.ingest.build import ingest as build_version

    summary = build_version(for_date(config, ds))
    return {**summary, "date": ds}


def dates_key(dataset: str, ds: str) -> str:
    return f"datasets/{dataset}/dates/{ds}"


def newest_date(store: Store, dataset: str) -> str | None:
    prefix = f"datasets/{dataset}/dates/"
    dates = [key[len(prefix) :] for key in store.list(prefix)]
    return max(dates) if dates else None


def validate(config: PipelineConfig, version: str, day: str | None = None) -> dict[str, Any]:
    """Run the quality gate on a committed version; on success it becomes ``LATEST``.

    With a date ``day`` (a scheduled or backfilled run) the version is also recorded as that
    day's (``datasets/<name>/dates/<day>``), and it becomes ``LATEST`` only if no later day
    has an accepted version: backfilling last month never rolls training back.

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
    newest = newest_date(store, ds.name) if day else None
    is_latest = day is None or newest is None or day >= newest
    if day is not None:
        store.write_pointer(dates_key(ds.name, day), version)
    if is_latest:
        store.write_pointer(latest_key(ds.name), version)
        log.info("dataset %s version %s passed the gate and is now LATEST", ds.name, version)
    else:
        log.info("dataset %s version %s (%s) passed the gate; LATEST stays on the %s version",
                 ds.name, version, day, newest)
    return {**verdict, "date": day, "is_latest": is_latest}


# -- runs ------------------------------------------------------------------------------


def prepare_run(
    config: PipelineConfig, dataset_version: str | None = None, extra_tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Pin the dataset versions, derive the run id from the inputs and store the config.

    ``dataset.version`` (``latest``, ids, ``last:N``, ``window:Nd``) is resolved to the exact
    ids it means now, so the run id (a hash of the resolved config) says what was read: the
    same inputs give the same run, a retry resumes it, a duplicate trigger finds it done.
    """
    from sd_pipeline.ingest.versions import resolve_versions

    store = store_for(config)
    wanted = dataset_version or config.dataset.version
    versions = resolve_versions(store, config.dataset.name, wanted)
    pinned = ",".join(versions)
    resolved = config.model_copy(update={"dataset": config.dataset.model_copy(update={"version": pinned})})
    run_id = run_id_for(resolved)
    config_key = f"runs/{run_id}/config.json"
    store.put_json(config_key, json.loads(resolved.to_json()))
    if extra_tags:
        store.put_json(f"runs/{run_id}/trigger.json", extra_tags)
    already = store.is_committed(f"runs/{run_id}/final")
    log.info(
        "run %s on %s/%s%s",
        run_id,
        resolved.dataset.name,
        pinned,
        " (already trained: will reuse)" if already else "",
    )
    return {
        "run_id": run_id,
        "config_uri": store.uri(config_key),
        "dataset": resolved.dataset.name,
        "dataset_version": pinned,
        "dataset_versions": versions,
        "already_trained": already,
    }


def cache(config: PipelineConfig, run_id: str, rebuild: bool = False) -> dict[str, Any]:
    """Compute (or find) the latent cache of the run's dataset versions and base model.

    Its own step, before training: the GPU pod that trains then loads neither the VAE nor
    the frozen text encoders. ``rebuild`` recomputes it even when one is committed.
    """
    from sd_pipeline.models.base import default_cache_dir, resolve_base_model
    from sd_pipeline.train.cache import ensure_cache
    from sd_pipeline.train.trainer import dataset_versions

    store = store_for(config)
    versions = dataset_versions(store, config)
    base = resolve_base_model(
        config.model.base, default_cache_dir(), endpoint_url=config.storage.endpoint_url
    )
    _, summary = ensure_cache(config, store, versions, base, rebuild=rebuild, splits=())
    return {"run_id": run_id, "versions": versions, **summary}


def invalidate_cache(config: PipelineConfig) -> dict[str, Any]:
    """Unpublish the latent cache of the config's inputs, so the next cache step recomputes it.

    For a cache built with a broken encoder or from a base model replaced in place; the
    marker goes first, so no reader ever sees a half-deleted cache.
    """
    from sd_pipeline.models.base import default_cache_dir, model_digest, resolve_base_model
    from sd_pipeline.storage import COMMITTED
    from sd_pipeline.train.cache import cache_fingerprint, cache_prefix
    from sd_pipeline.train.trainer import dataset_versions

    store = store_for(config)
    versions = dataset_versions(store, config)
    base = resolve_base_model(
        config.model.base, default_cache_dir(), endpoint_url=config.storage.endpoint_url
    )
    prefix = cache_prefix(config.dataset.name, cache_fingerprint(config, versions, model_digest(base)))
    existed = store.is_committed(prefix)
    store.delete_prefix(f"{prefix}/{COMMITTED}")
    removed = store.delete_prefix(prefix)
    log.info("latent cache %s %s", store.uri(prefix), "unpublished" if existed else "was not built")
    return {"cache_uri": store.uri(prefix), "existed": existed, "objects_removed": removed}


def train(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    from sd_pipeline.train.trainer import train as run_training

    return run_training(config, run_id)


def evaluate(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    from sd_pipeline.evaluate.evaluate import evaluate as run_evaluation

    return run_evaluation(config, run_id)


def register(config: PipelineConfig, run_id: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the run to MLflow, register its model as ``registry.alias`` and attach its model card.

    Idempotent per run id: a retry finds the version it registered. Tags carry the dataset
    version, the git commit (when known) and the Airflow dag and run that prepared the run.
    The run's monitoring summary (stage durations, GPU-hours, samples/s, dataset size) and
    where it stands against ``objectives`` are logged too, and returned in the summary.
    """
    import time

    from sd_pipeline.models.base import resolve_base_model
    from sd_pipeline.registry import monitoring, objectives
    from sd_pipeline.registry.lineage import airflow_tags, git_commit
    from sd_pipeline.registry.model_card import render_model_card
    from sd_pipeline.registry.tracking import log_and_register, log_model_card, log_run_extras

    started = time.monotonic()
    store = store_for(config)
    home = EmbeddedHome.from_env()
    final = f"runs/{run_id}/final"
    if not store.is_committed(final):
        raise FileNotFoundError(f"{store.uri(final)} is not committed; train run {run_id} first")
    if not store.is_committed(f"runs/{run_id}/eval"):
        raise FileNotFoundError(
            f"{store.uri(f'runs/{run_id}/eval')} is not committed; evaluate run {run_id} first"
        )
    report = store.get_json(f"runs/{run_id}/eval/metrics.json")
    train_meta = store.get_json(f"{final}/metadata.json")
    trigger_key = f"runs/{run_id}/trigger.json"
    trigger = store.get_json(trigger_key) if store.exists(trigger_key) else {}
    # The version the run trained on (a config may still say "latest" when run by hand).
    version = str((train_meta.get("dataset") or {}).get("version") or config.dataset.version)
    ds_prefix = version_prefix(config.dataset.name, version)
    dataset_records: dict[str, Any] = {
        "name": config.dataset.name,
        "version": version,
        "uri": store.uri(ds_prefix),
    }
    for field, name in (("ingest", "ingest.json"), ("verdict", "quality/verdict.json")):
        if store.exists(f"{ds_prefix}/{name}"):
            dataset_records[field] = store.get_json(f"{ds_prefix}/{name}")
    if store.exists(f"{ds_prefix}/DATACARD.md"):
        dataset_records["datacard"] = store.get_bytes(f"{ds_prefix}/DATACARD.md").decode("utf-8")
    prompt_set = report.get("prompt_set") or {}
    run_tags = {
        "sd_pipeline.run_id": run_id,
        "dataset.name": config.dataset.name,
        "dataset.version": version,
        "train.method": config.train.method,
        "sd_pipeline.config_fingerprint": config.fingerprint(),
        "sd_pipeline.prompt_set": f"{prompt_set.get('name')}@{prompt_set.get('version')}",
        **git_commit(),
        **airflow_tags(trigger),
        **(tags or {}),
    }
    with tempfile.TemporaryDirectory(prefix=f"sd-register-{run_id}-") as tmp:
        work = Path(tmp)
        model_dir = store.download_dir(final, work / "model")
        (model_dir / "_COMMITTED").unlink(missing_ok=True)
        artifacts: dict[str, Path] = {}
        for name in ("grid.png", "compare.png", "metrics.json"):
            if store.exists(f"runs/{run_id}/eval/{name}"):
                artifacts[f"eval/{name}"] = store.get_file(f"runs/{run_id}/eval/{name}", work / "eval" / name)
        config_file = work / "config" / "config.json"
        config_file.parent.mkdir(parents=True)
        config_file.write_text(config.to_json())
        artifacts["config/config.json"] = config_file
        for name in ("ingest.json", "quality/verdict.json", "DATACARD.md"):
            if store.exists(f"{ds_prefix}/{name}"):
                artifacts[f"dataset/{name}"] = store.get_file(f"{ds_prefix}/{name}", work / "dataset" / name)
        numeric = {k: float(v) for k, v in report["metrics"].items() if isinstance(v, (int, float))}
        champion = report.get("champion") or {}
        numeric.update(
            {
                f"champion.{k}": float(v)
                for k, v in (champion.get("metrics") or {}).items()
                if isinstance(v, (int, float))
            }
        )
        numeric.update(
            {
                f"train.{k}": float(train_meta[k])
                for k in ("seconds", "samples_per_s", "final_loss")
                if isinstance(train_meta.get(k), (int, float))
            }
        )
        accepted = (dataset_records.get("ingest") or {}).get("accepted")
        result = log_and_register(
            config.registry,
            run_id=run_id,
            # Without the operational fields (alerts, objectives, approvers, schedule): they may
            # change under the same run id, and MLflow params may not.
            params=config.training_dump(),
            metrics=numeric,
            artifacts=artifacts,
            model_dir=model_dir,
            base_model_dir=resolve_base_model(
                config.model.base, home.work_dir / "base-models", endpoint_url=config.storage.endpoint_url
            ),
            tags=run_tags,
            dataset={
                "name": config.dataset.name,
                "version": version,
                "uri": store.uri(ds_prefix),
                **({"samples": accepted} if accepted is not None else {}),
            },
        )
    watched = monitoring.run_summary(
        store, run_id, compute=config.compute, train=train_meta, evaluation=report, dataset=dataset_records,
        register_seconds=time.monotonic() - started,
    )
    watched_metrics = monitoring.mlflow_metrics(watched)
    standing = objectives.assess(config.objectives, {**numeric, **watched_metrics})
    objective_metrics, objective_tags = objectives.mlflow_records(standing)
    log_run_extras(
        config.registry,
        result["mlflow_run_id"],
        result["model_version"],
        metrics={**watched_metrics, **objective_metrics},
        tags=objective_tags,
        documents={"monitoring.json": watched, "objectives.json": standing},
    )
    store.put_json(f"runs/{run_id}/monitoring.json", watched)
    log.info("monitoring: %s", monitoring.summary_line(watched))
    log.info("objectives: %s", "; ".join(r["note"] for r in standing) or objectives.summary(standing))
    card = render_model_card(
        model_name=result["model_name"],
        model_version=result["model_version"],
        config=config,
        train=train_meta,
        evaluation=report,
        dataset=dataset_records,
        objectives=standing,
        monitoring=watched,
        lineage={
            "MLflow run": result["mlflow_run_id"],
            "pipeline run": run_id,
            **{k: v for k, v in run_tags.items() if k.startswith(("airflow.", "sd_pipeline.git_"))},
        },
    )
    store.put_bytes(f"runs/{run_id}/MODEL_CARD.md", card.encode("utf-8"))
    card_uri = log_model_card(config.registry, result["mlflow_run_id"], result["model_version"], card)
    summary = {
        **result,
        "run_id": run_id,
        "metrics": numeric,
        "grid_uri": store.uri(f"runs/{run_id}/eval/grid.png"),
        "comparison_grid_uri": (report.get("comparison_grid") or {}).get("uri"),
        "model_card_uri": card_uri,
        "monitoring": watched,
        "objectives": standing,
        "objectives_summary": objectives.summary(standing),
    }
    store.put_json(f"runs/{run_id}/registered.json", summary)
    store.write_pointer(f"pipelines/{config.name}/LAST_RUN", run_id)
    return summary


def run_id_for(config: PipelineConfig) -> str:
    """Same resolved config (dataset version included), same run id."""
    return f"{config.name}-{config.fingerprint()[:12]}"


# -- champion and challenger -------------------------------------------------------------


def promote(
    config: PipelineConfig,
    run_id: str,
    *,
    by: str = "",
    approval: dict[str, Any] | None = None,
    check_only: bool = False,
) -> dict[str, Any]:
    """Decide whether a registered run's version replaces the champion, record it, move the alias.

    The decision compares the run's evaluation with the champion's from the same evaluation
    (same prompts, seeds and holdout set) under ``registry.promote_when``. ``check_only``
    returns the verdict without recording anything; ``approval`` carries a person's answer
    when one was asked (``approved``, ``by``, ``comment``).
    """
    from sd_pipeline.registry.promotion import apply_promotion, check_promotion

    store = store_for(config)
    registered_key = f"runs/{run_id}/registered.json"
    if not store.exists(registered_key):
        raise FileNotFoundError(f"{store.uri(registered_key)} does not exist; register run {run_id} first")
    registered = store.get_json(registered_key)
    report = store.get_json(f"runs/{run_id}/eval/metrics.json")
    version = str(registered["model_version"])
    verdict = check_promotion(config.registry, version, report, store.uri(f"runs/{run_id}/eval"))
    base = {"run_id": run_id, "model_name": config.registry.model_name, "model_version": version}
    if check_only:
        return {**base, **verdict.to_dict(), "promote": verdict.promote}
    decision = apply_promotion(config.registry, version, verdict, by=by, approval=approval)
    result = {
        **base,
        **decision,
        "champion_uri": f"models:/{config.registry.model_name}@{config.registry.champion_alias}",
    }
    store.put_json(f"runs/{run_id}/promotion.json", result)
    return result


def rollback(
    config: PipelineConfig, *, by: str, reason: str, to_version: str | None = None
) -> dict[str, Any]:
    """Point the champion alias back at the previous champion (or ``to_version``), recorded."""
    from sd_pipeline.registry.promotion import rollback as roll_back

    return roll_back(config.registry, by=by, reason=reason, to_version=to_version)
