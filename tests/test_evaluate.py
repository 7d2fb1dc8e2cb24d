"""Evaluation, as a user sees it: holdout loss next to the base model's, and a picture grid."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from test_train import make_config, shape_samples, write_dataset  # noqa: E402

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
    train(make_config(root, model), "run-eval")
    return root, model


def test_evaluate_reports_losses_and_a_grid(
    trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, model = trained
    config = make_config(root, model)
    store = LocalStore(root / "store")
    with caplog.at_level(logging.INFO, logger="sd_pipeline.evaluate"):
        result = evaluate(config, "run-eval")

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
    assert evaluate(config, "run-eval") == result


def test_evaluating_an_untrained_run_is_explained(trained: tuple[Path, Path]) -> None:
    root, model = trained
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        evaluate(make_config(root, model), "never-trained")


def test_a_full_v_prediction_run_improves_on_its_base(tmp_path: Path) -> None:
    model = build_tiny_sd(tmp_path / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    write_dataset(LocalStore(tmp_path / "store"), shape_samples())
    config = make_config(tmp_path, model, **{
        "train.method": "full", "train.steps": 3, "model.prediction_type": "v_prediction",
    })
    train(config, "run-v")
    metrics = evaluate(config, "run-v")["metrics"]

    assert metrics["holdout_loss"] < metrics["base_holdout_loss"]
    report = LocalStore(tmp_path / "store").get_json("runs/run-v/eval/metrics.json")
    assert report["loss"]["prediction_type"] == "v_prediction"


def test_a_changed_base_model_is_refused(tmp_path: Path) -> None:
    model = build_tiny_sd(tmp_path / "tiny-sd", [s.caption for s in shape_samples()], seed=0)
    write_dataset(LocalStore(tmp_path / "store"), shape_samples())
    config = make_config(tmp_path, model, **{"train.steps": 1})
    train(config, "run-drift")
    (model / "scheduler" / "scheduler_config.json").write_text(
        (model / "scheduler" / "scheduler_config.json").read_text().replace("1000", "999")
    )
    with pytest.raises(ValueError, match="has changed since run 'run-drift'"):
        evaluate(config, "run-drift")


# -- prompt sets -------------------------------------------------------------------------


def test_the_default_prompt_set_ships_with_a_name_version_and_digest() -> None:
    from sd_pipeline.evaluate.prompts import load_prompt_set, shipped_prompt_sets

    assert "default-v1" in shipped_prompt_sets()
    default = load_prompt_set("default-v1")
    assert (default.name, default.version, len(default.prompts)) == ("default", "1", 4)
    assert default.source == "shipped:default-v1"
    assert default.sha256 == load_prompt_set("default-v1").sha256 and len(default.sha256) == 64

    inline = load_prompt_set("default-v1", ["a red circle", "a blue square"])
    assert inline.name == "inline" and inline.prompts == ["a red circle", "a blue square"]
    assert inline.version == inline.sha256[:12] != default.sha256[:12]


def test_a_config_can_point_at_its_own_prompt_set_file(tmp_path: Path) -> None:
    from sd_pipeline.evaluate.prompts import load_prompt_set

    (tmp_path / "faces-v3.yaml").write_text(
        "# comments do not change the digest\nname: faces\nversion: 3\nprompts:\n  - a smiling face\n")
    mine = load_prompt_set(f"file://{tmp_path / 'faces-v3.yaml'}")
    assert (mine.name, mine.version, mine.prompts) == ("faces", "3", ["a smiling face"])
    assert load_prompt_set(str(tmp_path / "faces-v3.yaml")).sha256 == mine.sha256

    (tmp_path / "bad.yaml").write_text("name: x\nprompts: [a]\n")
    with pytest.raises(ValueError, match=r"lacks \['version'\]"):
        load_prompt_set(str(tmp_path / "bad.yaml"))
    with pytest.raises(FileNotFoundError, match="shipped: \\['default-v1'"):
        load_prompt_set("default-v9")


# -- evaluator metrics: CLIP score, CLIP-feature distances, unsafe rate ---------------------


def build_tiny_clip(out: Path, captions: list[str]) -> Path:
    """A random-init CLIP (32 px images) with a tokenizer trained on ``captions``, saved offline."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from sd_pipeline.models.tiny import BOS, EOS, write_clip_vocab

    vocab = write_clip_vocab(out.parent / f"{out.name}-vocab", captions)
    tokenizer = CLIPTokenizer.from_pretrained(out.parent / f"{out.name}-vocab", model_max_length=32)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_tiny_safety_checker(out: Path, flag_everything: bool = False) -> Path:
    """diffusers' safety checker, random init; ``flag_everything`` sets every threshold below -1."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=16,
    ))
    if flag_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)  # cosine >= -1 > -2: every concept fires
    checker.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def evaluator_weights(trained: tuple[Path, Path]) -> dict[str, Path]:
    root, _ = trained
    captions = [s.caption for s in shape_samples()]
    return {"clip": build_tiny_clip(root / "clip", captions),
            "safety": build_tiny_safety_checker(root / "safety"),
            "unsafe": build_tiny_safety_checker(root / "safety-strict", flag_everything=True)}


def test_without_evaluator_weights_each_skipped_metric_says_why(trained: tuple[Path, Path]) -> None:
    root, model = trained
    evaluate(make_config(root, model), "run-eval")
    report = LocalStore(root / "store").get_json("runs/run-eval/eval/metrics.json")

    assert {"clip_score", "fd_clip", "kid_clip", "unsafe_rate", "fid"} <= set(report["skipped"])
    assert "evaluate.clip_model" in report["skipped"]["clip_score"]
    assert "evaluate.safety_checker" in report["skipped"]["unsafe_rate"]
    assert "torchvision" in report["evaluators"]["inception"]["reason"]
    assert report["metric_sources"]["holdout_loss"]["evaluator"] is None
    assert report["prompt_set"]["name"] == "inline"
    assert report["champion"] is None  # nothing registered: nothing to compare with


def test_clip_and_safety_metrics_run_and_name_their_weights(
    trained: tuple[Path, Path], evaluator_weights: dict[str, Path]
) -> None:
    from sd_pipeline.models.base import model_digest

    root, model = trained
    config = make_config(root, model, **{
        "evaluate.clip_model": str(evaluator_weights["clip"]),
        "evaluate.safety_checker": f"file://{evaluator_weights['safety']}",
        "evaluate.prompts": None,  # the shipped default set: 4 prompts
        "evaluate.compare_with_champion": False,
    })
    train(config, "run-clip")
    result = evaluate(config, "run-clip")
    report = LocalStore(root / "store").get_json("runs/run-clip/eval/metrics.json")

    metrics = result["metrics"]
    assert 0.0 <= metrics["clip_score"] <= 100.0
    assert metrics["fd_clip"] >= 0.0 and isinstance(metrics["kid_clip"], float)
    assert metrics["unsafe_rate"] == 0.0
    clip_source = report["metric_sources"]["clip_score"]
    assert clip_source["weights"] == str(evaluator_weights["clip"])
    assert clip_source["sha256"] == model_digest(evaluator_weights["clip"])
    assert report["metric_sources"]["fd_clip"]["images"] == 4  # the holdout split
    assert report["metric_sources"]["unsafe_rate"]["evaluator"] == "safety_checker"
    assert report["evaluators"]["clip"]["status"] == "used"
    assert {"clip_score", "unsafe_rate"}.isdisjoint(report["skipped"]) and "fid" in report["skipped"]
    assert report["prompt_set"]["name"] == "default" and len(report["grid"]["prompts"]) == 4
    assert report["champion"] == {"skipped": "evaluate.compare_with_champion is off"}
    grid = Image.open(io.BytesIO(LocalStore(root / "store").get_bytes("runs/run-clip/eval/grid.png")))
    assert grid.size == (2 * 64, 4 * 64)


def test_clip_score_is_torchmetrics_definition(
    trained: tuple[Path, Path], evaluator_weights: dict[str, Path]
) -> None:
    """100 x max(cos, 0) averaged over pairs, checked against CLIPModel's own forward."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from sd_pipeline.evaluate.evaluators import ClipEvaluator, weights_record

    path = evaluator_weights["clip"]
    clip = ClipEvaluator(path, weights_record("clip", str(path), path), torch.device("cpu"))
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "white")]
    prompts = ["a red circle on a white background", "a blue square", "a white background"]

    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    expected = (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).mean().item()
    assert clip.clip_score(images, prompts) == pytest.approx(expected, abs=1e-4)


def test_a_strict_safety_checker_flags_every_image(evaluator_weights: dict[str, Path]) -> None:
    import torch

    from sd_pipeline.evaluate.evaluators import SafetyEvaluator, weights_record

    path = evaluator_weights["unsafe"]
    checker = SafetyEvaluator(path, weights_record("safety_checker", str(path), path), torch.device("cpu"))
    assert checker.unsafe_rate([Image.new("RGB", (64, 64), "green")] * 3) == 1.0


def test_frechet_and_kernel_distances() -> None:
    import numpy as np

    from sd_pipeline.evaluate.evaluators import frechet_distance, kernel_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, means 2 apart in each of 4 dimensions: FD = 4 * 2^2.
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)
    b = rng.normal(size=(500, 4))
    assert abs(kernel_distance(a, b)) < 0.05 < kernel_distance(a, b + 2.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_side_by_side_grid_size_and_refusal() -> None:
    from sd_pipeline.evaluate.grids import GUTTER, LABEL_HEIGHT, side_by_side

    left, right = Image.new("RGB", (128, 256)), Image.new("RGB", (128, 256))
    both = side_by_side(left, right, "challenger", "champion v1")
    assert both.size == (2 * 128 + GUTTER, LABEL_HEIGHT + 256)
    with pytest.raises(ValueError, match="same prompts and seeds"):
        side_by_side(left, Image.new("RGB", (64, 64)), "a", "b")
