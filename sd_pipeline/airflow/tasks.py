"""Task bodies of the DAGs: each reads the Airflow context and calls one stage.

Heavy modules load inside the functions, at run time in the worker, never at parse time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sd_pipeline.airflow.params import overrides_from_params
from sd_pipeline.airflow.settings import config_path

if TYPE_CHECKING:
    from sd_pipeline.config import PipelineConfig

log = logging.getLogger("sd_pipeline.airflow")


def _context() -> Any:
    from airflow.sdk import get_current_context

    return get_current_context()


def _run_date() -> str:
    """The run's date: its logical date, or (a manual run without one) the day it runs."""
    ctx = _context()
    if ctx.get("ds"):
        return str(ctx["ds"])
    return str(ctx["dag_run"].run_after.date().isoformat())


def ingest() -> dict[str, Any]:
    from sd_pipeline import stages

    summary = stages.ingest(stages.load_config_uri(config_path()), ds=_run_date())
    log.info(
        "dataset %s version %s: %d accepted, %d quarantined (%s)",
        summary["dataset"],
        summary["version"],
        summary["accepted"],
        summary["quarantined"],
        summary["quarantine_reasons"],
    )
    return summary


def validate(ingested: dict[str, Any], asset: Any) -> dict[str, Any]:
    """Gate the version; on success annotate the dataset Asset's event with it."""
    from sd_pipeline import stages

    config = stages.load_config_uri(config_path())
    try:
        verdict = stages.validate(config, ingested["version"], ingested.get("date"))
    finally:  # a failed gate's report is what on-call opens first
        _push_report_links(config, ingested["dataset"], ingested["version"])
    _context()["outlet_events"][asset].extra = {
        "dataset": ingested["dataset"],
        "version": ingested["version"],
        "accepted": ingested["accepted"],
        "quarantined": ingested["quarantined"],
        "uri": ingested["uri"],
        "date": ingested.get("date"),
        "is_latest": verdict["is_latest"],
    }
    return verdict


def _push_report_links(config: PipelineConfig, dataset: str, version: str) -> None:
    from sd_pipeline.airflow.links import push_links, store_url
    from sd_pipeline.ingest.versions import version_prefix
    from sd_pipeline.stages import store_for

    store = store_for(config)
    prefix = version_prefix(dataset, version)
    verdict_key = f"{prefix}/quality/verdict.json"
    if not store.exists(verdict_key):
        return
    verdict = store.get_json(verdict_key)
    root = config.storage.root
    docs = [k for k in store.list(f"{prefix}/quality/data_docs/validations") if k.endswith(".html")]
    push_links(
        {
            "quality_report": store_url(root, verdict.get("report_uri")),
            "datacard": store_url(root, verdict.get("datacard_uri")),
            "data_docs": store_url(root, store.uri(docs[0])) if docs else None,
        }
    )


def _triggering_version() -> str | None:
    """The newest dataset version among the events that triggered this run.

    Raises AirflowSkipException when every triggering version was a backfill of an older
    day (not LATEST): retraining on last month's data is not what a new delivery means.
    """
    events = _context().get("triggering_asset_events") or {}
    extras = [e.extra for evs in events.values() for e in evs if e.extra]
    if not extras:
        return None
    current = [x for x in extras if x.get("is_latest", True)]
    if not current:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(
            f"triggered only by backfilled versions {[x.get('version') for x in extras]}, "
            "none of which is LATEST; nothing to retrain"
        )
    version = current[-1].get("version")
    return str(version) if version else None


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
    return stages.prepare_run(
        config,
        extra_tags={
            "airflow.dag_id": dag_run.dag_id,
            "airflow.run_id": dag_run.run_id,
            "airflow.triggered_by_asset": str(bool(triggered)),
        },
    )


def heavy_stage(stage: str, config: PipelineConfig, run: Any, after: Any = None) -> Any:
    """Declare the task of a heavy stage on its compute backend; returns the task's output.

    ``local``: a Python task running the stage command as a subprocess. ``kubernetes``: a
    KubernetesPodOperator running the same command in a GPU pod (its module, and so the
    Kubernetes client, loads only then). ``run`` is the ``prepare_run`` output; ``after``
    an upstream output to wait for. Either way the task returns the stage's JSON result.
    """
    if config.compute.backend_for(stage) == "kubernetes":
        from sd_pipeline.airflow.kubernetes import stage_pod_operator

        pod = stage_pod_operator(stage, config, run_task_id=run.operator.task_id)
        for upstream in (run, after):
            if upstream is not None:
                upstream >> pod
        return pod.output

    from airflow.sdk import task

    @task(task_id=stage)
    def local_stage(run: dict[str, Any], after: dict[str, Any] | None = None) -> dict[str, Any]:
        return run_stage(stage, run)

    return local_stage(run, after)


def run_stage(stage: str, run: dict[str, Any]) -> dict[str, Any]:
    """Run a heavy stage's command in a subprocess (the local backend)."""
    from sd_pipeline.compute import run_local

    return run_local(stage, run["config_uri"], run["run_id"])


def register(run: dict[str, Any]) -> dict[str, Any]:
    from sd_pipeline import stages

    ctx = _context()
    config = stages.load_config_uri(run["config_uri"])
    registered = stages.register(
        config,
        run["run_id"],
        tags={
            "airflow.dag_id": ctx["dag_run"].dag_id,
            "airflow.run_id": ctx["dag_run"].run_id,
        },
    )
    from sd_pipeline.airflow.links import mlflow_run_url, model_version_url, push_links, store_url

    push_links(
        {
            "sample_grid": store_url(config.storage.root, registered.get("grid_uri")),
            "mlflow_run": mlflow_run_url(registered["experiment_id"], registered["mlflow_run_id"])
            if registered.get("experiment_id")
            else None,
            "model_version": model_version_url(registered["model_name"], str(registered["model_version"])),
        }
    )
    return registered


# -- champion and challenger -------------------------------------------------------------

APPROVAL_TASK = "approve_promotion"
PROMOTE_TASK = "promote"
APPROVE, REJECT = "Approve", "Reject"
APPROVAL_SUBJECT = (
    "{% set v = ti.xcom_pull(task_ids='promotion_check', key='verdict') %}"
    "Promote {{ v.model_name }} version {{ v.model_version }} to champion?"
)
APPROVAL_BODY = """\
{% set v = ti.xcom_pull(task_ids='promotion_check', key='verdict') %}
Challenger **{{ v.model_name }} version {{ v.model_version }}** (pipeline run `{{ v.run_id }}`)
beats the champion{% if v.champion_version %} (version {{ v.champion_version }}){% endif %}:

{{ v.reason }}

Approve to make it `champion`; reject to keep it `challenger`. Either answer is recorded on
the model version with your name and comment.
"""


def promotion_check(run: dict[str, Any]) -> list[str]:
    """Branch: ask a person only when the form asks for approval and the challenger would win."""
    from sd_pipeline import stages

    ctx = _context()
    config = stages.load_config_uri(run["config_uri"])
    verdict = stages.promote(config, run["run_id"], check_only=True)
    ctx["ti"].xcom_push(key="verdict", value=verdict)
    wanted = ctx["params"].get("require_approval", config.registry.require_approval)
    log.info(
        "promotion verdict for %s version %s: %s (%s)",
        verdict["model_name"],
        verdict["model_version"],
        verdict["decision"],
        verdict["reason"],
    )
    if wanted and verdict["promote"]:
        return [APPROVAL_TASK, PROMOTE_TASK]
    return [PROMOTE_TASK]


def approval_from(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    """A human-in-the-loop answer (HITLOperator's XCom) as the approval promote records."""
    if not answer:
        return None
    user = answer.get("responded_by_user") or {}
    who = user.get("name") or user.get("id") or "nobody (the request timed out)"
    comment = (answer.get("params_input") or {}).get("comment") or ""
    return {"approved": list(answer.get("chosen_options") or []) == [APPROVE], "by": who, "comment": comment}


def promote(run: dict[str, Any]) -> dict[str, Any]:
    """Record the decision and move ``champion`` if the challenger won (and was approved)."""
    from sd_pipeline import stages

    ctx = _context()
    config = stages.load_config_uri(run["config_uri"])
    dag_run = ctx["dag_run"]
    approval = approval_from(ctx["ti"].xcom_pull(task_ids=APPROVAL_TASK))
    return stages.promote(
        config, run["run_id"], by=f"airflow:{dag_run.dag_id}/{dag_run.run_id}", approval=approval
    )


def rollback() -> dict[str, Any]:
    """Roll the champion back, as the sd_rollback form asks; records who and why."""
    from sd_pipeline import stages

    ctx = _context()
    params = ctx["params"]
    dag_run = ctx["dag_run"]
    who = params.get("requested_by") or getattr(dag_run, "triggering_user_name", None) or "unknown"
    if getattr(dag_run, "triggering_user_name", None) and who != dag_run.triggering_user_name:
        who = f"{who} (triggered by {dag_run.triggering_user_name})"
    config = stages.load_config_uri(config_path())
    return stages.rollback(config, by=who, reason=params["reason"], to_version=params.get("to_version"))
