"""Evaluation, as a user sees it: holdout loss next to the base model's, and a picture grid."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from test_train import VERSION, make_config, shape_samples, write_dataset  # noqa: E402

from sd_pipeline.evaluate.evaluate import evaluate  # noqa: E402
from sd_pipeline.models.tiny import build_tiny_sd  # noqa: E402
from sd_pipeline.storage import LocalStore  # noqa: E402
from sd_pipeline.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model and a 4-step LoRA run ``run-eval`` on the shapes dataset."""
    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_sd(root / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    write_dataset(LocalStore(root / "store"), shape_samples())
    train(make_config(root, model), "run-eval", VERSION)
    return root, model


def test_evaluate_reports_losses_and_a_grid(
    trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, model = trained
    config = make_config(root, model)
    store = LocalStore(root / "store")
    with caplog.at_level(logging.INFO, logger="sd_pipeline.evaluate"):
        result = evaluate(config, "run-eval", "latest")

    metrics = result["metrics"]
    for name in ("holdout_loss", "base_holdout_loss", "holdout_loss_t200", "base_holdout_loss_t700"):
        assert isinstance(metrics[name], float) and metrics[name] > 0
    assert metrics["holdout_samples"] == 4.0
    assert metrics["holdout_loss"] != metrics["base_holdout_loss"]  # the LoRA is applied
    assert metrics["holdout_loss_improvement"] == pytest.approx(
        metrics["base_holdout_loss"] - metrics["holdout_loss"]
    )

    assert result["grid_uri"] == store.uri("runs/run-eval/eval/grid.png")
    grid = Image.open(io.BytesIO(store.get_bytes("runs/run-eval/eval/grid.png")))
    assert grid.format == "PNG" and grid.size == (2 * 64, 2 * 64)  # 2 seeds x 2 prompts
    report = store.get_json("runs/run-eval/eval/metrics.json")
    assert report["metrics"] == metrics
    assert report["grid"]["prompts"] == config.evaluate.prompts
    assert store.is_committed("runs/run-eval/eval")
    assert any("holdout loss" in r.getMessage() for r in caplog.records)

    # Idempotent: evaluating again returns the published result.
    assert evaluate(config, "run-eval", VERSION) == result


def test_evaluating_an_untrained_run_is_explained(trained: tuple[Path, Path]) -> None:
    root, model = trained
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        evaluate(make_config(root, model), "never-trained", VERSION)


def test_a_full_v_prediction_run_improves_on_its_base(tmp_path: Path) -> None:
    model = build_tiny_sd(tmp_path / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    write_dataset(LocalStore(tmp_path / "store"), shape_samples())
    config = make_config(tmp_path, model, **{
        "train.method": "full", "train.steps": 3, "model.prediction_type": "v_prediction",
    })
    train(config, "run-v", VERSION)
    metrics = evaluate(config, "run-v", VERSION)["metrics"]

    assert metrics["holdout_loss"] < metrics["base_holdout_loss"]
    report = LocalStore(tmp_path / "store").get_json("runs/run-v/eval/metrics.json")
    assert report["loss"]["prediction_type"] == "v_prediction"


def test_a_changed_base_model_is_refused(tmp_path: Path) -> None:
    model = build_tiny_sd(tmp_path / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    write_dataset(LocalStore(tmp_path / "store"), shape_samples())
    config = make_config(tmp_path, model, **{"train.steps": 1})
    train(config, "run-drift", VERSION)
    (model / "scheduler" / "scheduler_config.json").write_text(
        (model / "scheduler" / "scheduler_config.json").read_text().replace("1000", "999")
    )
    with pytest.raises(ValueError, match="has changed since run 'run-drift'"):
        evaluate(config, "run-drift", VERSION)
