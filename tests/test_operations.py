"""Operating the pipeline from Airflow: one real sd_train run on the tiny model, then what an
operator relies on around it: the monitoring summary and objectives it reports, the retrigger
that trains nothing, approvals only from approvers (recorded), re-evaluation of the registered
version on a new prompt set, the cron schedule, and DAG owners and tags by role.

Airflow runs the DAGs itself (`airflow dags test`, SQLite); MLflow runs on SQLite.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("torch")

from test_train import make_config, shape_samples, write_dataset  # noqa: E402

from sd_pipeline.config import PipelineConfig, parse_config  # noqa: E402
from sd_pipeline.home import EmbeddedHome, airflow_env  # noqa: E402
from sd_pipeline.storage import LocalStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "sd-ops"
OBJECTIVES = [
    {"metric": "holdout_loss", "target": 50.0, "better": "lower"},
    {"metric": "monitoring.gpu_hours", "target": 0.0, "better": "lower"},
    {"metric": "monitoring.samples_per_s", "target": 1e9, "better": "higher"},
    {"metric": "clip_score", "target": 30.0, "better": "higher"},  # no CLIP weights: not measured
]
PROMPT_SET = """name: shapes-review
version: 2
description: two prompts the first evaluation did not use
prompts:
  - a yellow circle on a black background
  - a blue square on a white background
"""

TI_PROBE = r"""
import json, sys
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    rows = s.query(TaskInstance).filter(TaskInstance.dag_id == sys.argv[1]).all()
    out = {}
    for r in rows:
        out.setdefault(r.run_id, {})[r.task_id] = str(r.state)
    print(json.dumps(out))
"""


@dataclass
class Ops:
    root: Path
    config: PipelineConfig
    config_file: Path
    env: dict[str, str]
    store: LocalStore
    first: subprocess.CompletedProcess[str]

    def client(self) -> Any:
        uri = self.config.registry.tracking_uri
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def run_id(self) -> str:
        return str(self.store.read_pointer(f"pipelines/{self.config.name}/LAST_RUN"))

    def registered(self) -> dict[str, Any]:
        return self.store.get_json(f"runs/{self.run_id()}/registered.json")

    def airflow(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=self.env,
                              capture_output=True, text=True, timeout=900)

    def task_states(self, dag_id: str) -> dict[str, dict[str, str]]:
        out = subprocess.run([sys.executable, "-c", TI_PROBE, dag_id], env=self.env, capture_output=True,
                             text=True, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    from sd_pipeline.models.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("ops")
    model = build_tiny_sd(root / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    store = LocalStore(root / "store")
    write_dataset(store, shape_samples(), version="0123456789abcdef")  # as ingest names them
    config = make_config(root, model, **{
        "registry.tracking_uri": f"sqlite:///{root}/mlflow/mlflow.db",
        "registry.artifact_location": str(root / "mlflow" / "artifacts"),
        "registry.experiment": "ops-test",
        "registry.model_name": MODEL,
        "registry.approvers": ["alice"],
        "objectives": OBJECTIVES,
    })
    config_file = root / "pipeline.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, **airflow_env(EmbeddedHome(root / "home")), "SD_PIPELINE_CONFIG": str(config_file),
           "SD_PIPELINE_HOME": str(root / "home")}
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    first = subprocess.run([airflow, "dags", "test", "sd_train"], env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    yield Ops(root, config, config_file, env, store, first)


# -- monitoring and objectives ------------------------------------------------------------------


def test_each_run_reports_its_durations_gpu_hours_throughput_and_data(ops: Ops) -> None:
    registered = ops.registered()
    watched = registered["monitoring"]
    meta = ops.store.get_json(f"runs/{ops.run_id()}/final/metadata.json")
    timings = {k.rsplit("/", 1)[-1].removesuffix(".json"): ops.store.get_json(k)["seconds"]
               for k in ops.store.list(f"runs/{ops.run_id()}/timings")}
    # Measured around each Airflow task; register times itself.
    assert set(timings) == {"prepare_run", "cache", "train", "evaluate"}
    assert {k: watched["durations_s"][k] for k in timings} == timings
    assert watched["durations_s"]["register"] > 0
    assert watched["duration_sources"]["train"] == "airflow task"
    # The train task's wall time covers the trainer's own measure of its loop.
    assert watched["durations_s"]["train"] >= meta["seconds"]
    assert watched["total_s"] == pytest.approx(sum(watched["durations_s"].values()), abs=0.01)
    assert (watched["device"], watched["gpus"], watched["gpu_hours"]) == ("cpu", 0, 0.0)  # CPU run
    assert watched["samples_per_s"] == meta["samples_per_s"]
    assert watched["dataset"]["train_samples"] == meta["dataset"]["train_samples"]

    client = ops.client()
    run = client.get_run(registered["mlflow_run_id"])
    assert run.data.metrics["monitoring.gpu_hours"] == 0.0
    assert run.data.metrics["monitoring.duration_s.train"] == pytest.approx(timings["train"])
    assert run.data.metrics["monitoring.samples_per_s"] == pytest.approx(meta["samples_per_s"])
    logged = client.download_artifacts(registered["mlflow_run_id"], "monitoring.json", str(ops.root))
    assert json.loads(Path(logged).read_text()) == watched


def test_each_run_reports_where_it_stands_against_the_objectives(ops: Ops) -> None:
    registered = ops.registered()
    standing = {r["metric"]: r for r in registered["objectives"]}
    assert list(standing) == [o["metric"] for o in OBJECTIVES]
    loss = registered["metrics"]["holdout_loss"]
    assert standing["holdout_loss"]["value"] == pytest.approx(loss)
    assert standing["holdout_loss"]["met"] is (loss <= 50.0)
    assert standing["monitoring.gpu_hours"]["met"] is True  # 0 GPU-hours on CPU
    assert standing["monitoring.samples_per_s"]["met"] is False  # nobody trains at 1e9 samples/s
    assert standing["clip_score"]["met"] is None and "not measured" in standing["clip_score"]["note"]
    met = sum(r["met"] is True for r in standing.values())
    assert registered["objectives_summary"].startswith(f"{met} of 4 objectives met; missed: "
                                                       "monitoring.samples_per_s; not measured: clip_score")

    client = ops.client()
    run = client.get_run(registered["mlflow_run_id"])
    assert run.data.tags["objective.monitoring.samples_per_s.met"] == "false"
    assert run.data.tags["objective.clip_score.met"] == "unmeasured"
    assert run.data.tags["objectives.met"] == f"{met}/4"
    assert run.data.metrics["objective.holdout_loss.margin"] == pytest.approx(50.0 - loss)
    version = client.get_model_version(MODEL, registered["model_version"])
    assert version.tags["objectives.met"] == f"{met}/4"
    card = (ops.root / "store" / "runs" / ops.run_id() / "MODEL_CARD.md").read_text()
    assert "## Objectives" in card and "| clip_score | ≥ 30 | n/a | not measured |" in card
    assert "## Cost" in card and "GPU-hours: 0.0" in card


def test_the_operational_fields_do_not_change_the_run_id(ops: Ops) -> None:
    changed = parse_config(json.loads(ops.config.to_json()), {
        "alerts.connection_id": "sd_alerts", "registry.approvers": ["bob"], "train.schedule": "@weekly",
        "objectives": []})
    assert changed.fingerprint() == ops.config.fingerprint()
    assert parse_config(json.loads(ops.config.to_json()), {"train.seed": 9}).fingerprint() != (
        ops.config.fingerprint())


# -- no duplicate runs ---------------------------------------------------------------------------


def test_a_retrigger_with_the_same_inputs_trains_nothing_and_says_which_model_covers_it(ops: Ops) -> None:
    before = len(ops.client().search_model_versions(f"name = '{MODEL}'"))
    second = ops.airflow("dags", "test", "sd_train")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    registered = ops.registered()
    assert (f"nothing to do: run {ops.run_id()} " in log
            and f"is already {MODEL} version {registered['model_version']}" in log)
    runs = ops.task_states("sd_train")
    assert len(runs) == 2
    first, latest = (runs[run] for run in sorted(runs))  # manual__<timestamp>
    assert first["promote"] == "success"
    assert latest["prepare_run"] == "skipped"
    assert {latest[t] for t in ("cache", "train", "evaluate", "register", "promote")} == {"skipped"}
    assert len(ops.client().search_model_versions(f"name = '{MODEL}'")) == before


# -- approvals -----------------------------------------------------------------------------------


def test_the_approval_request_is_assigned_to_the_approvers(ops: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    for key in ("AIRFLOW_HOME", "SD_PIPELINE_CONFIG", "SD_PIPELINE_HOME"):
        monkeypatch.setenv(key, ops.env[key])
    from sd_pipeline.airflow import settings

    settings._load.cache_clear()
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["sd_train"]
    assert dag.get_task("approve_promotion").assigned_users == [{"id": "alice", "name": "alice"}]
    settings._load.cache_clear()


def test_promote_refuses_an_approval_from_someone_else_and_records_both(
    ops: Ops, caplog: pytest.LogCaptureFixture
) -> None:
    from sd_pipeline import stages
    from sd_pipeline.registry import promotion

    client = ops.client()
    version = ops.registered()["model_version"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version  # promoted by the DAG
    # Make it a winning challenger again: with no champion, the first version wins.
    client.delete_registered_model_alias(MODEL, "champion")
    run_config = stages.load_config_uri(str(ops.root / "store" / "runs" / ops.run_id() / "config.json"))
    caplog.set_level(logging.INFO, logger="sd_pipeline.registry")

    mallory = {"approved": True, "by": "mallory", "user_id": "mallory", "comment": "ship it",
               "at": "2026-11-27T10:00:00+00:00"}
    with pytest.raises(promotion.ApprovalRefused, match=r"approval by 'mallory' refused: only "
                       r"registry.approvers \['alice'\] may approve"):
        stages.promote(run_config, ops.run_id(), by="airflow:sd_train/manual__1", approval=mallory)
    assert MODEL not in [m.name for m in client.search_registered_models()
                         if "champion" in m.aliases]  # the alias did not move
    tags = client.get_model_version(MODEL, version).tags
    assert tags["sd_pipeline.approval_refused.by"] == "mallory"
    assert "only registry.approvers ['alice']" in tags["sd_pipeline.approval_refused.reason"]

    alice = {"approved": True, "by": "alice", "user_id": "alice", "comment": "samples reviewed",
             "at": "2026-11-27T11:00:00+00:00"}
    decision = stages.promote(run_config, ops.run_id(), by="airflow:sd_train/manual__2", approval=alice)
    assert decision["decision"] == "promoted"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version
    tags = client.get_model_version(MODEL, version).tags
    assert (tags[promotion.APPROVED_BY_TAG], tags[promotion.APPROVAL_TAG]) == ("alice", "approved")
    assert tags[promotion.APPROVAL_AT_TAG] == "2026-11-27T11:00:00+00:00"
    assert tags[promotion.APPROVAL_COMMENT_TAG] == "samples reviewed"
    assert tags[promotion.DECIDED_BY_TAG] == "airflow:sd_train/manual__2"
    assert datetime.fromisoformat(tags[promotion.DECIDED_AT_TAG]) <= datetime.now(UTC)
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit:")]
    assert any("approval by 'mallory' refused" in m for m in audit)
    answered = "answered approved by alice at 2026-11-27T11:00:00+00:00 (samples reviewed)"
    assert any(answered in m for m in audit)
    assert any(f"{MODEL} version {version}: promoted by airflow:sd_train/manual__2" in m for m in audit)


# -- re-evaluation -------------------------------------------------------------------------------


def test_sd_reevaluate_logs_a_new_prompt_sets_metrics_to_the_versions_run(ops: Ops) -> None:
    prompt_file = ops.root / "shapes-review.yaml"
    prompt_file.write_text(PROMPT_SET)
    run_id, registered = ops.run_id(), ops.registered()
    original = (ops.root / "store" / "runs" / run_id / "eval" / "metrics.json").read_text()
    conf = {"model_version": registered["model_version"], "prompt_set": str(prompt_file)}
    out = ops.airflow("dags", "test", "sd_reevaluate", "-c", json.dumps(conf))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    folder = ops.root / "store" / "runs" / run_id / "reevaluations" / "shapes-review"
    report = json.loads((folder / "metrics.json").read_text())
    assert report["prompt_set"]["name"] == "shapes-review" and report["prompt_set"]["version"] == "2"
    assert report["grid"]["prompts"] == ["a yellow circle on a black background",
                                         "a blue square on a white background"]
    assert (ops.root / "store" / "runs" / run_id / "eval" / "metrics.json").read_text() == original
    run = ops.client().get_run(registered["mlflow_run_id"])
    logged = {k.removeprefix("reeval.shapes-review."): v for k, v in run.data.metrics.items()
              if k.startswith("reeval.shapes-review.")}
    assert logged == pytest.approx({k: v for k, v in report["metrics"].items() if isinstance(v, float)})
    assert run.data.metrics["holdout_loss"] == registered["metrics"]["holdout_loss"]  # the original stays
    assert run.data.tags["reeval.shapes-review.prompt_set"] == "shapes-review@2"
    assert run.data.tags["reeval.shapes-review.prompt_set_sha256"] == report["prompt_set"]["sha256"]
    listed = ops.client().list_artifacts(registered["mlflow_run_id"], "reeval/shapes-review")
    artifacts = {a.path for a in listed}
    assert artifacts == {"reeval/shapes-review/grid.png", "reeval/shapes-review/metrics.json"}


def test_the_reevaluate_form_is_typed_and_bounded(ops: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    for key in ("AIRFLOW_HOME", "SD_PIPELINE_CONFIG", "SD_PIPELINE_HOME"):
        monkeypatch.setenv(key, ops.env[key])
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["sd_reevaluate"]
    params = dag.params
    assert params["model_version"] == "champion"
    assert params.get_param("model_version").resolve("12") == "12"
    for bad in ("../x", "v 1", ""):
        with pytest.raises(ParamValidationError):
            params.get_param("model_version").resolve(bad)
    with pytest.raises(ParamValidationError):
        params.get_param("prompt_set").resolve(None)  # required
    assert params.get_param("prompt_set").schema["title"] == "Prompt set"
    assert [t.task_id for t in dag.tasks] == ["resolve_version", "reevaluate", "log_metrics"]


# -- schedules, owners and tags ------------------------------------------------------------------


def _dags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    from sd_pipeline.airflow import settings

    config = tmp_path / "pipeline.json"
    config.write_text(parse_config({}, overrides).to_json())
    monkeypatch.setenv("SD_PIPELINE_CONFIG", str(config))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    settings._load.cache_clear()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    settings._load.cache_clear()
    assert bag.import_errors == {}
    return dict(bag.dags)


def test_sd_train_retrains_on_its_cron_or_a_new_dataset_version(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.timetables.base import DataInterval, TimeRestriction

    train = _dags(tmp_path, monkeypatch, **{"train.schedule": "0 3 * * 1"})["sd_train"]
    timetable = train.timetable
    assert isinstance(timetable, AssetOrTimeSchedule)
    assert "sd_dataset_shapes" in str(timetable.asset_condition)
    from airflow.serialization.encoders import coerce_to_core_timetable

    core = coerce_to_core_timetable(timetable)
    after = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)  # a Wednesday
    info = core.next_dagrun_info(
        last_automated_data_interval=DataInterval(after, after),
        restriction=TimeRestriction(earliest=None, latest=None, catchup=False),
    )
    assert info is not None and info.run_after == datetime(2026, 11, 30, 3, 0, tzinfo=UTC)  # next Monday
    plain = _dags(tmp_path, monkeypatch)["sd_train"]
    assert not isinstance(plain.timetable, AssetOrTimeSchedule)
    assert "sd_dataset_shapes" in str(plain.timetable.asset_condition)


def test_every_dag_has_an_owner_and_a_tag_by_role(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_pipeline.airflow.settings import ROLES

    dags = _dags(tmp_path, monkeypatch)
    for dag in dags.values():
        owner = dag.default_args["owner"]
        assert owner in ROLES, f"{dag.dag_id}: owner {owner!r} is not a role {ROLES}"
        assert owner in dag.tags, f"{dag.dag_id}: tags {dag.tags} lack its role {owner}"
    assert dags["sd_ingest"].default_args["owner"] == "data-engineering"
    assert dags["sd_train"].default_args["owner"] == "modelling"
    assert dags["sd_rollback"].default_args["owner"] == "release"
