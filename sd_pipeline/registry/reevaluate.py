"""Re-evaluate a registered model version on another prompt set, beside its first evaluation.

Three steps, so that the heavy one runs where evaluations run (``sd_reevaluate`` DAG, or
``sd-pipeline reevaluate``):

1. :func:`prepare`: find the version's pipeline run, write a config that is the run's own
   with ``evaluate.prompt_set`` replaced (no champion comparison), under
   ``runs/<run_id>/reevaluations/<set>/config.json``;
2. :func:`reevaluate`: the evaluate stage on that config, publishing to
   ``runs/<run_id>/reevaluations/<set>/`` (the original ``eval/`` is left untouched);
3. :func:`log_to_mlflow`: the new metrics on the version's MLflow run as
   ``reeval.<set>.<metric>``, its grid and report as artifacts under ``reeval/<set>/``, and
   tags saying which prompt set (name, version, sha256), when and who.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from sd_pipeline.config import PipelineConfig
from sd_pipeline.registry.promotion import RegistryRefused
from sd_pipeline.registry.tracking import RUN_TAG, open_client

log = logging.getLogger("sd_pipeline.registry")

METRIC_PREFIX = "reeval"
VERSION_OR_ALIAS = re.compile(r"^([0-9]+|[a-z][a-z0-9_-]{0,62})$")


def set_label(name: str) -> str:
    """A prompt set's name as MLflow metric names allow it (letters, digits, ``_ - .``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "unnamed"


def out_prefix(run_id: str, label: str) -> str:
    return f"runs/{run_id}/reevaluations/{label}"


def resolve_version(config: PipelineConfig, model_version: str) -> dict[str, str]:
    """A version number or alias (``champion``) of ``registry.model_name``: its runs."""
    from mlflow.exceptions import MlflowException

    cfg = config.registry
    if not VERSION_OR_ALIAS.fullmatch(model_version):
        raise RegistryRefused(f"model_version {model_version!r} is neither a version number nor an alias")
    client = open_client(cfg)
    try:
        mv = (client.get_model_version(cfg.model_name, model_version) if model_version.isdigit()
              else client.get_model_version_by_alias(cfg.model_name, model_version))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{cfg.model_name}'"))
        raise RegistryRefused(
            f"{cfg.model_name} has no version or alias {model_version!r}; versions: {known}"
        ) from None
    run_id = mv.tags.get(RUN_TAG)
    if not run_id:
        raise RegistryRefused(
            f"{cfg.model_name} version {mv.version} has no {RUN_TAG} tag: it was not registered by "
            "sd-pipeline, so its weights cannot be found in the store"
        )
    return {"model_name": cfg.model_name, "model_version": str(mv.version), "run_id": run_id,
            "mlflow_run_id": str(mv.run_id)}


def prepare(config: PipelineConfig, model_version: str, prompt_set: str) -> dict[str, Any]:
    """Resolve the version and store the re-evaluation's config; returns what the next steps need."""
    from sd_pipeline.evaluate.prompts import load_prompt_set
    from sd_pipeline.stages import load_config_uri, store_for

    version = resolve_version(config, model_version)
    store = store_for(config)
    run_id = version["run_id"]
    run_config_key = f"runs/{run_id}/config.json"
    if not store.exists(run_config_key):
        raise FileNotFoundError(
            f"{store.uri(run_config_key)} does not exist; version {version['model_version']}'s run "
            f"{run_id} is not in the store {config.storage.root}"
        )
    run_config = load_config_uri(store.uri(run_config_key))
    prompts = load_prompt_set(prompt_set, None, endpoint_url=config.storage.endpoint_url)
    evaluate = run_config.evaluate.model_copy(
        update={"prompt_set": prompt_set, "prompts": None, "compare_with_champion": False}
    )
    reeval_config = run_config.model_copy(update={"evaluate": evaluate})
    label = set_label(prompts.name)
    config_key = f"{out_prefix(run_id, label)}/config.json"
    store.put_json(config_key, json.loads(reeval_config.to_json()))
    log.info("re-evaluating %s version %s (run %s) on prompt set %s v%s (%d prompts)",
             version["model_name"], version["model_version"], run_id, prompts.name, prompts.version,
             len(prompts.prompts))
    return {
        **version,
        "config_uri": store.uri(config_key),
        "dataset": run_config.dataset.name,
        "dataset_version": run_config.dataset.version,
        "prompt_set": {"name": prompts.name, "version": prompts.version, "sha256": prompts.sha256,
                       "source": prompts.source},
        "label": label,
    }


def reevaluate(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    """The heavy step: evaluate run ``run_id`` with ``config`` (a :func:`prepare` config)."""
    from sd_pipeline.evaluate.evaluate import evaluate
    from sd_pipeline.evaluate.prompts import load_prompt_set

    ev = config.evaluate
    prompts = load_prompt_set(ev.prompt_set, ev.prompts, endpoint_url=config.storage.endpoint_url)
    return evaluate(config, run_id, out_prefix=out_prefix(run_id, set_label(prompts.name)))


def log_to_mlflow(config: PipelineConfig, prepared: dict[str, Any], result: dict[str, Any],
                  by: str = "") -> dict[str, Any]:
    """Log a finished re-evaluation to the version's MLflow run; returns what was logged."""
    import tempfile
    from pathlib import Path

    from sd_pipeline.registry.tracking import _log_metrics_and_tags
    from sd_pipeline.stages import store_for

    label = prepared["label"]
    prefix = f"{METRIC_PREFIX}.{label}"
    metrics = {f"{prefix}.{k}": float(v) for k, v in (result.get("metrics") or {}).items()
               if isinstance(v, (int, float))}
    ps = prepared["prompt_set"]
    tags = {
        f"{prefix}.prompt_set": f"{ps['name']}@{ps['version']}",
        f"{prefix}.prompt_set_sha256": ps["sha256"],
        f"{prefix}.at": datetime.now(UTC).isoformat(timespec="seconds"),
        f"{prefix}.report": str(result.get("metrics_uri")),
    }
    if by:
        tags[f"{prefix}.by"] = by
    client = open_client(config.registry)
    run = prepared["mlflow_run_id"]
    _log_metrics_and_tags(client, run, metrics, tags)
    store = store_for(config)
    folder = out_prefix(prepared["run_id"], label)
    with tempfile.TemporaryDirectory(prefix="sd-reeval-") as tmp:
        for name in ("grid.png", "metrics.json"):
            if store.exists(f"{folder}/{name}"):
                client.log_artifact(run, str(store.get_file(f"{folder}/{name}", Path(tmp) / name)),
                                    f"{METRIC_PREFIX}/{label}")
    client.set_model_version_tag(config.registry.model_name, prepared["model_version"],
                                 f"{prefix}.prompt_set", tags[f"{prefix}.prompt_set"])
    log.info("audit: logged %d metrics of prompt set %s to %s version %s (MLflow run %s)%s: %s",
             len(metrics), tags[f"{prefix}.prompt_set"], prepared["model_name"], prepared["model_version"],
             run, f" for {by}" if by else "",
             ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return {**prepared, "metrics": metrics, "tags": tags, "grid_uri": result.get("grid_uri")}


def run_all(config: PipelineConfig, model_version: str, prompt_set: str, by: str = "") -> dict[str, Any]:
    """The three steps in this process (``sd-pipeline reevaluate --model-version …``)."""
    from sd_pipeline.stages import load_config_uri

    prepared = prepare(config, model_version, prompt_set)
    result = reevaluate(load_config_uri(prepared["config_uri"]), prepared["run_id"])
    return log_to_mlflow(config, prepared, result, by=by)
