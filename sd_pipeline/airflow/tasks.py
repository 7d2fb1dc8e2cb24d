"""Task bodies of the DAGs: each reads the Airflow context and calls one stage.

Heavy modules load inside the functions, at run time in the worker, never at parse time.
"""

from __future__ import annotations

import logging
from typing import Any

from sd_pipeline.airflow.params import overrides_from_params
from sd_pipeline.airflow.settings import config_path

log = logging.getLogger("sd_pipeline.airflow")


def _context() -> Any:
    from airflow.sdk import get_current_context

    return get_current_context()


def ingest() -> dict[str, Any]:
    from sd_pipeline import stages

    summary = stages.ingest(stages.load_config_uri(config_path()))
    log.info("dataset %s version %s: %d accepted, %d quarantined (%s)", summary["dataset"],
             summary["version"], summary["accepted"], summary["quarantined"],
             summary["quarantine_reasons"])
    return summary


def validate(ingested: dict[str, Any], asset: Any) -> dict[str, Any]:
    """Gate the version; on success annotate the dataset Asset's event with it."""
    from sd_pipeline import stages

    verdict = stages.validate(stages.load_config_uri(config_path()), ingested["version"])
    _context()["outlet_events"][asset].extra = {
        "dataset": ingested["dataset"],
        "version": ingested["version"],
        "accepted": ingested["accepted"],
        "quarantined": ingested["quarantined"],
        "uri": ingested["uri"],
    }
    return verdict


def _triggering_version() -> str | None:
    events = _context().get("triggering_asset_events") or {}
    versions = [e.extra.get("version") for evs in events.values() for e in evs if e.extra]
    return versions[-1] if versions else None


def prepare() -> dict[str, Any]:
    """Resolve the config with the form's params and pin the dataset version."""
    from sd_pipeline import stages

    ctx = _context()
    params = dict(ctx["params"])
    overrides = overrides_from_params(params)
    triggered = _triggering_version()
    if triggered:
        overrides["dataset.version"] = triggered
    config = stages.load_config_uri(config_path(), overrides)
    dag_run = ctx["dag_run"]
    return stages.prepare_run(config, extra_tags={
        "airflow.dag_id": dag_run.dag_id, "airflow.run_id": dag_run.run_id,
        "airflow.triggered_by_asset": str(bool(triggered)),
    })


def run_stage(stage: str, run: dict[str, Any]) -> dict[str, Any]:
    """Run a heavy stage on the configured compute backend (local subprocess here)."""
    from sd_pipeline.compute import run_local
    from sd_pipeline.stages import load_config_uri

    config = load_config_uri(run["config_uri"])
    if config.compute.backend != "local":
        raise NotImplementedError(
            f"compute.backend={config.compute.backend!r} runs through KubernetesPodOperator; "
            "this task only serves the local backend"
        )
    return run_local(stage, run["config_uri"], run["run_id"])


def register(run: dict[str, Any]) -> dict[str, Any]:
    from sd_pipeline import stages

    ctx = _context()
    config = stages.load_config_uri(run["config_uri"])
    return stages.register(config, run["run_id"], tags={
        "airflow.dag_id": ctx["dag_run"].dag_id, "airflow.run_id": ctx["dag_run"].run_id,
    })
