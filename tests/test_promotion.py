"""Champion and challenger on the embedded default, told as one story in order.

Three real training runs on the tiny model (LoRA, full, LoRA) go through evaluate, register and promote:
the first becomes champion, a better second replaces it, a worse third stays challenger.
Then the champion is loaded from the registry and draws, a person rolls it back, and a
reviewer rejects and then approves its return. MLflow runs on SQLite in a temp folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from test_train import make_config, shape_samples, write_dataset  # noqa: E402

from sd_pipeline import stages  # noqa: E402
from sd_pipeline.cli import main as cli  # noqa: E402
from sd_pipeline.config import PipelineConfig, PromotionRule  # noqa: E402
from sd_pipeline.models.tiny import build_tiny_sd  # noqa: E402
from sd_pipeline.registry import promotion  # noqa: E402
from sd_pipeline.storage import LocalStore  # noqa: E402

MODEL = "sd-shapes"
VERSION = "0123456789abcdef"  # a dataset version id as ingest makes them (16 hex)
# Better by construction: a few LoRA steps barely move the tiny model's holdout loss; a full
# fine-tune of 6 steps lowers it by a wide margin (about 1.13 -> 0.7).
RUNS = {
    "first": {"train.steps": 2, "train.learning_rate": 1e-2},
    "better": {"train.method": "full", "train.steps": 6, "train.learning_rate": 1e-3},
    "worse": {"train.steps": 3, "train.seed": 1, "train.learning_rate": 1e-2},
}


@dataclass
class Story:
    root: Path
    store: LocalStore
    configs: dict[str, PipelineConfig]
    run_ids: dict[str, str]
    registered: dict[str, dict[str, Any]]
    decisions: dict[str, dict[str, Any]]
    config_file: Path

    def client(self) -> Any:
        uri = self.configs["first"].registry.tracking_uri
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def version(self, v: str) -> Any:
        return self.client().get_model_version(MODEL, v)

    def alias(self, alias: str) -> str:
        return str(self.client().get_model_version_by_alias(MODEL, alias).version)


def run_pipeline(
    config: PipelineConfig, name: str
) -> tuple[PipelineConfig, str, dict[str, Any], dict[str, Any]]:
    """What sd_train does for one trigger: prepare, train, evaluate, register, promote."""
    prepared = stages.prepare_run(config, extra_tags={"airflow.dag_id": "sd_train",
                                                      "airflow.run_id": f"manual__{name}"})
    run_config = stages.load_config_uri(prepared["config_uri"])
    run_id = prepared["run_id"]
    stages.train(run_config, run_id)
    stages.evaluate(run_config, run_id)
    registered = stages.register(run_config, run_id)
    return run_config, run_id, registered, stages.promote(run_config, run_id, by="ci")


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    import torch

    root = tmp_path_factory.mktemp("promotion")
    # Tiny tensors gain nothing from a second thread, and on a shared 2-core machine its
    # spin-waiting made this story up to 3x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD_PIPELINE_HOME", str(root / "home"))
        mp.setenv("SD_PIPELINE_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
        model = build_tiny_sd(root / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
        store = LocalStore(root / "store")
        write_dataset(store, shape_samples(), version=VERSION)
        common = {
            "registry.tracking_uri": f"sqlite:///{root}/mlflow/mlflow.db",
            "registry.artifact_location": str(root / "mlflow" / "artifacts"),
            "registry.experiment": "promotion-test",
            "registry.model_name": MODEL,
            "evaluate.prompts": None,  # the shipped default prompt set
        }
        s = Story(root, store, {}, {}, {}, {}, root / "pipeline.json")
        for name, overrides in RUNS.items():
            config, run_id, registered, decision = run_pipeline(
                make_config(root, model, **common, **overrides), name)
            s.configs[name], s.run_ids[name] = config, run_id
            s.registered[name], s.decisions[name] = registered, decision
        s.config_file.write_text(s.configs["first"].to_json())
        try:
            yield s
        finally:
            torch.set_num_threads(threads)


def test_the_first_version_becomes_champion(story: Story) -> None:
    decision = story.decisions["first"]
    assert (decision["model_version"], decision["decision"]) == ("1", "promoted")
    assert "no champion yet" in decision["reason"]
    tags = story.version("1").tags
    assert tags[promotion.DECISION_TAG] == "promoted"
    assert tags[promotion.DECIDED_BY_TAG] == "ci"
    assert tags[promotion.PREVIOUS_CHAMPION_TAG] == ""
    assert tags[promotion.COMPARED_WITH_TAG] == "none"


def test_a_better_second_run_becomes_champion(story: Story) -> None:
    decision = story.decisions["better"]
    assert (decision["model_version"], decision["decision"]) == ("2", "promoted")
    assert "beats champion version 1: holdout_loss" in decision["reason"]
    tags = story.version("2").tags
    assert tags[promotion.PREVIOUS_CHAMPION_TAG] == "1"
    assert tags[promotion.DECIDED_AT_TAG].endswith("+00:00")
    [check] = json.loads(tags[promotion.CHECKS_TAG])
    assert check["metric"] == "holdout_loss" and check["passed"] and check["challenger"] < check["champion"]

    # It was evaluated next to the champion with the same prompts and seeds.
    report = story.store.get_json(f"runs/{story.run_ids['better']}/eval/metrics.json")
    assert report["champion"]["model_version"] == "1"
    assert report["champion"]["run_id"] == story.run_ids["first"]
    assert report["champion"]["metrics"]["holdout_loss"] == pytest.approx(check["champion"])
    run = story.client().get_run(story.registered["better"]["mlflow_run_id"])
    assert run.data.metrics["champion.holdout_loss"] == pytest.approx(check["champion"])


def test_a_worse_third_run_stays_challenger(story: Story) -> None:
    decision = story.decisions["worse"]
    assert (decision["model_version"], decision["decision"]) == ("3", "kept_challenger")
    assert "does not beat champion version 2" in decision["reason"]
    assert story.alias("champion") == "2"
    assert story.alias("challenger") == "3"
    tags = story.version("3").tags
    assert tags[promotion.DECISION_TAG] == "kept_challenger"
    assert tags[promotion.COMPARED_WITH_TAG] == "2"
    assert promotion.PREVIOUS_CHAMPION_TAG not in tags


def test_grids_exist_and_are_the_right_size(story: Story) -> None:
    def size(run: str, name: str) -> tuple[int, int]:
        key = f"runs/{story.run_ids[run]}/eval/{name}"
        return Image.open(io.BytesIO(story.store.get_bytes(key))).size

    grid = (2 * 64, 4 * 64)  # 2 seeds x 4 prompts of the default set, 64 px
    assert size("first", "grid.png") == grid
    assert not story.store.exists(f"runs/{story.run_ids['first']}/eval/compare.png")  # no champion yet
    from sd_pipeline.evaluate.grids import GUTTER, LABEL_HEIGHT

    assert size("worse", "compare.png") == (2 * grid[0] + GUTTER, LABEL_HEIGHT + grid[1])
    mlflow_run = story.registered["worse"]["mlflow_run_id"]
    artifacts = {a.path for a in story.client().list_artifacts(mlflow_run, "eval")}
    assert {"eval/grid.png", "eval/compare.png", "eval/metrics.json"} <= artifacts


def test_a_retried_registration_or_promotion_adds_nothing(story: Story) -> None:
    config, run_id = story.configs["worse"], story.run_ids["worse"]
    again = stages.register(config, run_id)
    assert again["model_version"] == "3"
    assert again["mlflow_run_id"] == story.registered["worse"]["mlflow_run_id"]
    assert len(story.client().search_model_versions(f"name = '{MODEL}'")) == 3
    assert stages.promote(config, run_id, by="ci")["decision"] == "kept_challenger"
    champion = stages.promote(story.configs["better"], story.run_ids["better"], by="ci")
    assert champion["decision"] == "already_champion"
    assert story.alias("champion") == "2"


def test_a_registered_version_carries_its_lineage_and_model_card(story: Story) -> None:
    import yaml

    client, registered = story.client(), story.registered["better"]
    tags = story.version("2").tags
    assert tags["sd_pipeline.git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["airflow.dag_id"] == "sd_train" and tags["airflow.run_id"] == "manual__better"
    run = client.get_run(registered["mlflow_run_id"])
    assert run.data.tags["mlflow.source.git.commit"] == tags["sd_pipeline.git_commit"]
    assert run.data.tags["sd_pipeline.prompt_set"] == "default@1"
    assert run.data.params["train.steps"] == "6"
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("shapes", VERSION)

    top = {a.path for a in client.list_artifacts(registered["mlflow_run_id"])}
    assert {"MODEL_CARD.md", "config", "eval"} <= top  # MLflow 3 keeps the logged model apart
    card_file = mlflow.artifacts.download_artifacts(registered["model_card_uri"],
                                                   dst_path=str(story.root / "card"))
    card = Path(card_file).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(story.root / "tiny-sd")
    assert front["license"] == "other" and front["datasets"] == ["shapes"]
    assert {"full-fine-tune", "text-to-image"} <= set(front["tags"])
    for section in ("## Training details", "## Evaluation results", "## Intended use",
                    "## Limitations and bias", "## Lineage"):
        assert section in card
    assert "| holdout_loss |" in card and "champion v1" in card
    assert "clip_score: evaluate.clip_model is not set" in card  # what was not measured, and why
    assert story.version("2").description.startswith("A full UNet fine-tune of")


def test_the_champion_loads_from_the_registry_and_draws(story: Story) -> None:
    mlflow.set_tracking_uri(story.configs["first"].registry.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = model.predict(__import__("pandas").DataFrame(
        {"prompt": ["a red circle on a blue background"], "seed": [0], "num_inference_steps": [2]}))
    image = Image.open(io.BytesIO(out["image"][0]))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_rollback_restores_the_previous_champion_with_who_and_why(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["rollback", "--config", str(story.config_file), "--reason", "v2 draws blurry stars",
                "--by", "alice"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["from_version"], result["to_version"], result["by"]) == ("2", "1", "alice")
    assert story.alias("champion") == "1"
    demoted, restored = story.version("2").tags, story.version("1").tags
    assert demoted["sd_pipeline.rollback.by"] == "alice"
    assert demoted["sd_pipeline.rollback.reason"] == "v2 draws blurry stars"
    assert demoted["sd_pipeline.rollback.to"] == "1"
    assert restored["sd_pipeline.restored.from"] == "2"

    # Version 1 was the first champion: there is nothing before it, and the CLI says so.
    assert cli(["rollback", "--config", str(story.config_file), "--reason", "again", "--by", "alice"]) == 1
    assert "no previous champion recorded" in capsys.readouterr().err


def test_a_reviewer_rejects_then_approves_the_return_of_a_winner(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run_id = story.configs["better"], story.run_ids["better"]
    assert story.alias("champion") == "1"  # after the rollback above
    before = story.version("2").tags

    assert cli(["promote", "--config", str(story.config_file), "--run-id", run_id, "--check"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["promote"] is True and verdict["champion_version"] == "1"
    assert story.version("2").tags == before  # a check records nothing

    rejected = stages.promote(config, run_id, by="airflow:sd_train/manual__2",
                              approval={"approved": False, "by": "bob", "comment": "wait for the review"})
    assert rejected["decision"] == "rejected_by_reviewer"
    assert story.alias("champion") == "1"
    assert story.version("2").tags[promotion.REASON_TAG].startswith("rejected by bob: wait for the review")

    approved = stages.promote(config, run_id, by="airflow:sd_train/manual__3",
                              approval={"approved": True, "by": "carol", "comment": "looks right"})
    assert approved["decision"] == "promoted" and story.alias("champion") == "2"
    tags = story.version("2").tags
    assert tags[promotion.APPROVED_BY_TAG] == "carol"
    assert tags[promotion.PREVIOUS_CHAMPION_TAG] == "1"


@pytest.mark.slow
def test_the_rollback_dag_rolls_back_in_airflow(story: Story, tmp_path: Path) -> None:
    """sd_rollback through Airflow's task runner, with the form's params as conf."""
    from sd_pipeline.home import EmbeddedHome, airflow_env

    assert story.alias("champion") == "2"  # after the approval above
    env = {**os.environ, **airflow_env(EmbeddedHome(tmp_path)), "SD_PIPELINE_CONFIG": str(story.config_file)}
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    conf = {"reason": "v2 fails the brand review", "requested_by": "erin"}
    out = subprocess.run([airflow, "dags", "test", "sd_rollback", "-c", json.dumps(conf)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert story.alias("champion") == "1"
    tags = story.version("2").tags
    assert tags["sd_pipeline.rollback.reason"] == "v2 fails the brand review"
    assert tags["sd_pipeline.rollback.by"].startswith("erin")  # and who triggered it, if known


def test_an_evaluation_against_an_older_champion_is_not_trusted(story: Story) -> None:
    """Run 'worse' was compared with version 2; with version 1 champion it must be re-evaluated."""
    cfg = story.configs["worse"].registry
    if story.alias("champion") != "1":  # the Airflow rollback above did it unless deselected
        stages.rollback(story.configs["worse"], by="alice", reason="set up the stale case")
    assert story.alias("champion") == "1"
    report = story.store.get_json(f"runs/{story.run_ids['worse']}/eval/metrics.json")
    verdict = promotion.check_promotion(cfg, "3", report, "file:///eval")
    assert verdict.decision == "keep"
    assert "compared with version 2 but @champion is version 1" in verdict.reason


# -- the decision rules alone ----------------------------------------------------------


def test_rules_need_every_metric_better_by_its_margin() -> None:
    rules = [PromotionRule(metric="holdout_loss", better="lower", min_delta=0.01),
             PromotionRule(metric="clip_score", better="higher")]
    champion = {"holdout_loss": 0.50, "clip_score": 20.0}
    assert promotion.decide(rules, {"holdout_loss": 0.45, "clip_score": 21.0}, champion, "4").promote
    small = promotion.decide(rules, {"holdout_loss": 0.495, "clip_score": 21.0}, champion, "4")
    assert not small.promote and "holdout_loss" in small.reason
    tie = promotion.decide(rules[1:], {"clip_score": 20.0}, champion, "4")
    assert not tie.promote  # equal is not better
    missing = promotion.decide(rules, {"holdout_loss": 0.1}, champion, "4")
    assert not missing.promote and "clip_score was not measured for the challenger" in missing.reason
    assert promotion.decide(rules, {}, None).promote  # the first version


def test_approval_answers_become_recorded_approvals() -> None:
    from sd_pipeline.airflow.tasks import approval_from

    assert approval_from(None) is None
    answer = {"chosen_options": ["Approve"], "params_input": {"comment": "ok"},
              "responded_by_user": {"id": "7", "name": "dana"}}
    assert approval_from(answer) == {"approved": True, "by": "dana", "comment": "ok", "user_id": "7"}
    timed_out = {"chosen_options": ["Reject"], "params_input": {}, "responded_by_user": None}
    assert approval_from(timed_out) == {"approved": False, "by": "nobody (the request timed out)",
                                        "comment": "", "timed_out": True}


# -- the DAGs ----------------------------------------------------------------------------


@pytest.fixture
def dag_bag(home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_HOME", str(home / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parent.parent / "dags"))
    assert bag.import_errors == {}
    return bag


def test_sd_train_promotes_after_register_with_optional_approval(dag_bag: Any) -> None:
    from airflow.providers.standard.operators.hitl import HITLOperator

    dag = dag_bag.dags["sd_train"]
    check, approve, promote = (dag.get_task(t) for t in ("promotion_check", "approve_promotion", "promote"))
    assert "register" in check.upstream_task_ids
    assert isinstance(approve, HITLOperator) and approve.upstream_task_ids == {"promotion_check"}
    assert {"promotion_check", "approve_promotion"} <= promote.upstream_task_ids
    # promote runs whether the approval was asked (and answered) or skipped by the branch
    assert promote.trigger_rule == "none_failed_min_one_success"
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]
    assert dag.params["require_approval"] is False


def test_sd_rollback_asks_why_and_lets_who_and_version_be_chosen(dag_bag: Any) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    dag = dag_bag.dags["sd_rollback"]
    assert [t.task_id for t in dag.tasks] == ["rollback"]
    with pytest.raises(ParamValidationError):
        dag.params.get_param("reason").resolve("no")  # shorter than 3 characters
    with pytest.raises(ParamValidationError):
        dag.params.get_param("to_version").resolve("latest")
    assert dag.params.get_param("to_version").resolve("3") == "3"
    assert dag.params.get_param("requested_by").resolve(None) is None


def test_the_approval_request_shows_the_verdict() -> None:
    import jinja2

    from sd_pipeline.airflow.tasks import APPROVAL_BODY, APPROVAL_SUBJECT

    verdict = {"model_name": MODEL, "model_version": "7", "run_id": "demo-abc", "champion_version": "5",
               "reason": "beats champion version 5: holdout_loss 0.41 vs champion 0.45"}

    class TaskInstance:
        def xcom_pull(self, task_ids: str, key: str) -> dict[str, Any]:
            assert (task_ids, key) == ("promotion_check", "verdict")
            return verdict

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    subject = env.from_string(APPROVAL_SUBJECT).render(ti=TaskInstance())
    body = env.from_string(APPROVAL_BODY).render(ti=TaskInstance())
    assert subject == f"Promote {MODEL} version 7 to champion?"
    assert "version 7** (pipeline run `demo-abc`)" in body and "(version 5)" in body
    assert verdict["reason"] in body
