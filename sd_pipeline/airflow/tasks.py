"""Task bodies of the DAGs: each reads the Airflow context and calls one stage.

Heavy modules load inside the functions, at run time in the worker, never at parse time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sd_pipeline.airflow.errors import GateFailed, fail_fast
from sd_pipeline.airflow.params import approval_wanted, overrides_from_params, unknown_conf_keys
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


def validate(ingested: dict[str, Any], asset: Any) -> dict[str, Any]:
    """Gate the version; on success annotate the dataset Asset's event with it."""
    from sd_pipeline import stages

    with fail_fast("quality gate"):
        config = stages.load_config_uri(config_path())
    try:
        with fail_fast("quality gate"):
            try:
                verdict = stages.validate(config, ingested["version"], ingested.get("date"))
            except stages.QualityGateFailed as err:
                # Never retried, and alerted as its own kind with the failed expectations.
                raise GateFailed(str(err), _rejected_verdict(config, ingested)) from err
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


def _rejected_verdict(config: PipelineConfig, ingested: dict[str, Any]) -> dict[str, Any]:
    """The verdict the gate recorded with the version's REJECTED marker (for the alert)."""
    from sd_pipeline.ingest.versions import version_prefix
    from sd_pipeline.stages import store_for

    store = store_for(config)
    key = f"{version_prefix(ingested['dataset'], ingested['version'])}/REJECTED"
    verdict: dict[str, Any] = store.get_json(key) if store.exists(key) else {}
    return {"dataset": ingested["dataset"], "version": ingested["version"], **verdict}


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
    dag_run = ctx["dag_run"]
    unknown = unknown_conf_keys(dict(dag_run.conf or {}), params)
    if unknown:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"the trigger's conf has keys that are no param of {dag_run.dag_id}: {unknown}; "
            f"its params are {sorted(params)} (a typo would otherwise train with the defaults)"
        )
    triggered = _triggering_version()
    with fail_fast("prepare_run"):
        configured = stages.load_config_uri(config_path())
        approval_wanted(params, configured.registry)  # refuses a run that would switch approval off
        overrides = overrides_from_params(params, configured)
        if triggered:
            overrides["dataset.version"] = triggered
        config = stages.load_config_uri(config_path(), overrides)
        prepared = stages.prepare_run(
            config,
            extra_tags={
                "airflow.dag_id": dag_run.dag_id,
                "airflow.run_id": dag_run.run_id,
                "airflow.triggered_by_asset": str(bool(triggered)),
            },
        )
        covered = already_covered(config, prepared)
    if covered is not None:
        _skip_duplicate(config, prepared, covered)
    return prepared


def already_covered(config: PipelineConfig, prepared: dict[str, Any]) -> dict[str, Any] | None:
    """The registration of a finished run with the same inputs, or None.

    Finished means registered and a promotion decided: a run that stopped between register
    and promote is completed by the next trigger instead (every stage finds its own result).
    """
    from sd_pipeline.stages import store_for

    if not prepared.get("already_trained"):
        return None
    store = store_for(config)
    run_id = prepared["run_id"]
    registered_key, promotion_key = f"runs/{run_id}/registered.json", f"runs/{run_id}/promotion.json"
    if not (store.exists(registered_key) and store.exists(promotion_key)):
        return None
    return {**store.get_json(registered_key), "promotion": store.get_json(promotion_key).get("decision")}


def _skip_duplicate(config: PipelineConfig, prepared: dict[str, Any], covered: dict[str, Any]) -> None:
    """Skip this run (and so every task after it): its inputs already made a registered model."""
    from airflow.sdk.exceptions import AirflowSkipException

    from sd_pipeline.airflow.links import model_version_url, push_links

    note = (
        f"nothing to do: run {prepared['run_id']} (dataset {prepared['dataset']}@"
        f"{prepared['dataset_version']}, same config) is already {covered['model_name']} version "
        f"{covered['model_version']} (MLflow run {covered.get('mlflow_run_id')}, promotion: "
        f"{covered.get('promotion')}); trigger with other params or a new dataset version to train again"
    )
    log.info("%s", note)
    push_links({"model_version": model_version_url(covered["model_name"], str(covered["model_version"]))})
    raise AirflowSkipException(note)


def heavy_stage(stage: str, config: PipelineConfig, run: Any, after: Any = None) -> Any:
    """Declare the task of a heavy stage on its compute backend; returns the task's output.

    ``local``: a Python task running the stage command as a subprocess. ``kubernetes``: a
    KubernetesPodOperator running the same command in a GPU pod (its module, and so the
    Kubernetes client, loads only then). ``run`` is the ``prepare_run`` output; ``after``
    an upstream output to wait for. Either way the task returns the stage's JSON result.
    """
    compute_stage = "evaluate" if stage == "reevaluate" else stage  # a re-evaluation runs like one
    if config.compute.backend_for(compute_stage) == "kubernetes":
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

    # StageFailed carries the command's last lines: S3 throttling there is still transient.
    with fail_fast(stage):
        return run_local(stage, run["config_uri"], run["run_id"])


def register(run: dict[str, Any]) -> dict[str, Any]:
    from sd_pipeline import stages

    ctx = _context()
    with fail_fast("register"):
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


TIMED_TASKS = ("prepare_run", "cache", "train", "evaluate")  # register times itself


def record_duration(context: Any) -> None:
    """``on_success_callback`` of sd_train's tasks: the task's wall time, for the run's monitoring.

    Timed from the task instance's start, so a GPU pod's whole life (scheduling, image pull,
    training) counts, just as the local subprocess's does. Failing to record never fails a task.
    """
    from datetime import UTC, datetime

    ti = context["ti"]
    if ti.task_id not in TIMED_TASKS or not getattr(ti, "start_date", None):
        return
    try:
        from sd_pipeline import stages
        from sd_pipeline.registry.monitoring import record_stage_time

        run = ti.xcom_pull(task_ids="prepare_run")
        if not isinstance(run, dict) or "run_id" not in run:
            return
        store = stages.store_for(stages.load_config_uri(run["config_uri"]))
        record = record_stage_time(
            store,
            run["run_id"],
            ti.task_id,
            ti.start_date,
            datetime.now(UTC),
            try_number=int(getattr(ti, "try_number", 1) or 1),
        )
        log.info("%s of run %s took %.1f s", ti.task_id, run["run_id"], record["seconds"])
    except Exception as err:  # noqa: BLE001 - monitoring must not fail the pipeline
        log.warning("could not record the duration of %s: %s", ti.task_id, err)


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
    """Branch: ask a person when approval is wanted (config or form) and the challenger would win."""
    from sd_pipeline import stages

    ctx = _context()
    with fail_fast("promotion_check"):
        config = stages.load_config_uri(run["config_uri"])
        verdict = stages.promote(config, run["run_id"], check_only=True)
        wanted = approval_wanted(ctx["params"], config.registry)
    ctx["ti"].xcom_push(key="verdict", value=verdict)
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
    approved = list(answer.get("chosen_options") or []) == [APPROVE]
    approval: dict[str, Any] = {"approved": approved, "by": who, "comment": comment}
    if user.get("id"):
        approval["user_id"] = str(user["id"])
    if answer.get("responded_at"):
        at = answer["responded_at"]
        approval["at"] = at.isoformat(timespec="seconds") if hasattr(at, "isoformat") else str(at)
    if not user:
        approval["timed_out"] = True
    return approval


def promote(run: dict[str, Any]) -> dict[str, Any]:
    """Record the decision and move ``champion`` if the challenger won (and was approved)."""
    from sd_pipeline import stages

    ctx = _context()
    dag_run = ctx["dag_run"]
    approval = approval_from(ctx["ti"].xcom_pull(task_ids=APPROVAL_TASK))
    with fail_fast("promote"):
        config = stages.load_config_uri(run["config_uri"])
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
    with fail_fast("rollback"):
        config = stages.load_config_uri(config_path())
        return stages.rollback(config, by=who, reason=params["reason"], to_version=params.get("to_version"))


# -- re-evaluation of a registered version ---------------------------------------------------


def reevaluation_prepare() -> dict[str, Any]:
    """Find the form's model version and store its re-evaluation config (sd_reevaluate)."""
    from sd_pipeline import stages
    from sd_pipeline.registry import reevaluate

    params = _context()["params"]
    with fail_fast("resolve_version"):
        config = stages.load_config_uri(config_path())
        return reevaluate.prepare(config, str(params["model_version"]), str(params["prompt_set"]))


def reevaluation_log(prepared: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Log the re-evaluation's metrics to the version's MLflow run, as reeval.<set>.<metric>."""
    from sd_pipeline import stages
    from sd_pipeline.airflow.links import mlflow_run_url, model_version_url, push_links, store_url
    from sd_pipeline.registry import reevaluate

    dag_run = _context()["dag_run"]
    who = getattr(dag_run, "triggering_user_name", None) or f"airflow:{dag_run.dag_id}/{dag_run.run_id}"
    with fail_fast("log_metrics"):
        config = stages.load_config_uri(config_path())
        logged = reevaluate.log_to_mlflow(config, prepared, result, by=who)
        client = reevaluate.open_client(config.registry)
        experiment_id = client.get_run(prepared["mlflow_run_id"]).info.experiment_id
    push_links(
        {
            "sample_grid": store_url(config.storage.root, result.get("grid_uri")),
            "mlflow_run": mlflow_run_url(experiment_id, prepared["mlflow_run_id"]),
            "model_version": model_version_url(prepared["model_name"], prepared["model_version"]),
        }
    )
    return logged
