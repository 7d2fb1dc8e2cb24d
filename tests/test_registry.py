"""MLflow tracking and registration on a SQLite store, with a tiny real diffusers model."""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
mlflow = pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sd_pipeline.config import RegistryConfig  # noqa: E402
from sd_pipeline.registry.tracking import RUN_TAG, flatten_params, log_and_register  # noqa: E402

RESOLVED_CONFIG = {
    "name": "demo",
    "train": {"method": "full", "steps": 3, "learning_rate": 0.001},
    "evaluate": {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1]},
    "registry": {"model_name": "sd-test", "alias": "challenger"},
}


def build_tiny_pipeline(out: Path) -> None:
    """A random-weight SD pipeline a few hundred KB big: 32 px images, 2-letter BPE-free vocab."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Empty merges: every word splits into letters, the last one marked with </w>.
    letters = string.ascii_lowercase
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    tok_dir = out.parent / "tokenizer-src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    base = root / "base" / "tiny-sd"
    build_tiny_pipeline(base)
    # A full fine-tune's output: the trained UNet (here the base one, saved again).
    finetuned = root / "final"
    (finetuned / "unet").parent.mkdir(parents=True)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(base / "unet").save_pretrained(finetuned / "unet")
    grid = root / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n placeholder")
    metrics_json = root / "metrics.json"
    metrics_json.write_text(json.dumps({"holdout_loss": 0.42}))
    return {"root": root, "base": base, "final": finetuned, "grid": grid, "metrics": metrics_json}


@pytest.fixture(scope="module")
def cfg(workspace: dict[str, Path]) -> RegistryConfig:
    root = workspace["root"]
    return RegistryConfig(
        tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db",
        artifact_location=str(root / "mlartifacts"),
        experiment="sd-pipeline-test",
        model_name="sd-test",
        alias="challenger",
    )


def register(cfg: RegistryConfig, workspace: dict[str, Path], run_id: str) -> dict[str, str]:
    return log_and_register(
        cfg,
        run_id=run_id,
        params=RESOLVED_CONFIG,
        metrics={"holdout_loss": 0.42, "clip_score": 0.1},
        artifacts={"eval/grid.png": workspace["grid"], "eval/metrics.json": workspace["metrics"]},
        model_dir=workspace["final"],
        base_model_dir=workspace["base"],
        tags={"sd_pipeline.config_fingerprint": "f00d"},
        dataset={
            "name": "shapes",
            "version": "0123456789abcdef",
            "uri": "file:///data/datasets/shapes/versions/0123456789abcdef",
            "rows": 60,
        },
    )


@pytest.fixture(scope="module")
def first(cfg: RegistryConfig, workspace: dict[str, Path]) -> dict[str, str]:
    return register(cfg, workspace, "manual__2026-11-27T10:00:00+00:00")


def test_flatten_params_gives_dotted_keys() -> None:
    assert flatten_params(RESOLVED_CONFIG)["train.steps"] == "3"
    assert flatten_params(RESOLVED_CONFIG)["evaluate.prompts"] == '["a red circle", "a blue square"]'
    assert len(flatten_params({"x": "y" * 7000})["x"]) == 6000


def test_first_registration_is_version_1_with_alias(cfg: RegistryConfig, first: dict[str, str]) -> None:
    assert first["model_name"] == "sd-test"
    assert first["model_version"] == "1"
    assert first["alias"] == "challenger"
    assert first["model_uri"] == "models:/sd-test/1"

    client = mlflow.MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    version = client.get_model_version_by_alias("sd-test", "challenger")
    assert str(version.version) == "1"
    assert version.tags[RUN_TAG] == "manual__2026-11-27T10:00:00+00:00"
    assert version.tags["sd_pipeline.dataset_version"] == "0123456789abcdef"

    run = client.get_run(first["mlflow_run_id"])
    assert run.info.run_name == "manual__2026-11-27T10:00:00+00:00"
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.metrics["holdout_loss"] == pytest.approx(0.42)
    assert run.data.tags["sd_pipeline.config_fingerprint"] == "f00d"
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "shapes"
    assert dataset_input.dataset.digest == "0123456789abcdef"
    assert "shapes/versions/0123456789abcdef" in dataset_input.dataset.source
    logged = {a.path for a in client.list_artifacts(first["mlflow_run_id"], "eval")}
    assert logged == {"eval/grid.png", "eval/metrics.json"}


def test_same_run_id_returns_the_same_version(
    cfg: RegistryConfig, workspace: dict[str, Path], first: dict[str, str]
) -> None:
    again = register(cfg, workspace, "manual__2026-11-27T10:00:00+00:00")

    assert again == first
    client = mlflow.MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    assert len(client.search_model_versions("name = 'sd-test'")) == 1
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.experiment).experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = 'manual__2026-11-27T10:00:00+00:00'",
    )
    assert len(runs) == 1
    assert len(runs[0].inputs.dataset_inputs) == 1


def test_changed_config_for_the_same_run_id_is_refused(
    cfg: RegistryConfig, workspace: dict[str, Path], first: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match=r"param train.steps is '3' .* but '4' now"):
        log_and_register(
            cfg,
            run_id="manual__2026-11-27T10:00:00+00:00",
            params={**RESOLVED_CONFIG, "train": {**RESOLVED_CONFIG["train"], "steps": 4}},
            metrics={},
            artifacts={},
            model_dir=workspace["final"],
            base_model_dir=workspace["base"],
            tags={},
            dataset={"name": "shapes", "version": "0123456789abcdef", "uri": "file:///data/x"},
        )


def test_another_run_id_registers_version_2_and_moves_the_alias(
    cfg: RegistryConfig, workspace: dict[str, Path], first: dict[str, str]
) -> None:
    second = register(cfg, workspace, "scheduled__2026-11-28T00:00:00+00:00")

    assert second["model_version"] == "2"
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    client = mlflow.MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("sd-test", "challenger").version) == "2"


def test_registered_model_loads_by_alias_and_draws_a_png(cfg: RegistryConfig, first: dict[str, str]) -> None:
    from PIL import Image

    mlflow.set_tracking_uri(cfg.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@{cfg.alias}")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle"], "num_inference_steps": [2]}))

    assert list(out.columns) == ["image"]
    assert len(out) == 1
    image = Image.open(io.BytesIO(out["image"][0]))
    assert image.format == "PNG"
    assert image.size == (32, 32)


def test_a_deleted_version_is_registered_again_from_the_runs_logged_model(
    cfg: RegistryConfig, workspace: dict[str, Path]
) -> None:
    retry_cfg = cfg.model_copy(update={"model_name": "sd-retry"})
    client = mlflow.MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    first = register(retry_cfg, workspace, "retry-run")
    source = client.get_model_version("sd-retry", first["model_version"]).source
    client.delete_model_version("sd-retry", first["model_version"])

    again = register(retry_cfg, workspace, "retry-run")

    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["model_version"] == "2"
    assert client.get_model_version("sd-retry", "2").source == source


def test_lora_weights_load_on_top_of_the_base_model(cfg: RegistryConfig, workspace: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    lora_dir = workspace["root"] / "lora-final"
    unet = UNet2DConditionModel.from_pretrained(workspace["base"] / "unet")
    unet.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    StableDiffusionPipeline.save_lora_weights(
        lora_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
    lora_cfg = cfg.model_copy(update={"model_name": "sd-lora"})
    result = log_and_register(
        lora_cfg,
        run_id="lora-run",
        params={"train": {"method": "lora"}},
        metrics={},
        artifacts={},
        model_dir=lora_dir,
        base_model_dir=workspace["base"],
        tags={},
        dataset={"name": "shapes", "version": "0123456789abcdef", "uri": "file:///data/x"},
    )

    model = mlflow.pyfunc.load_model(result["model_uri"])
    out = model.predict(
        pd.DataFrame(
            {"prompt": ["a blue square", "a red circle"], "seed": [1, 2], "num_inference_steps": [2, 2]}
        )
    )
    assert [Image.open(io.BytesIO(png)).size for png in out["image"]] == [(32, 32), (32, 32)]


# -- model card and lineage ----------------------------------------------------------------

DATACARD = """# Data card: shapes

## Overview
Coloured shapes.

## Known limitations
Only four shapes; no textures.

## Bias
Red is over-represented (40% of images).
"""


def test_model_card_has_hf_front_matter_and_the_data_cards_limitations() -> None:
    import yaml

    from sd_pipeline.config import parse_config
    from sd_pipeline.registry.model_card import render_model_card

    config = parse_config({}, {"registry.model_card.base_model": "runwayml/stable-diffusion-v1-5",
                               "registry.model_card.license": "creativeml-openrail-m"},
                          env={"SD_PIPELINE_HOME": "/home"})
    report = {
        "metrics": {"holdout_loss": 0.41, "clip_score": 27.5},
        "champion": {"model_version": "3", "metrics": {"holdout_loss": 0.45, "clip_score": 26.0}},
        "metric_sources": {"clip_score": {"evaluator": "clip", "weights": "s3://models/clip-vit-l14",
                                          "sha256": "ab" * 32}},
        "skipped": {"unsafe_rate": "evaluate.safety_checker is not set"},
        "prompt_set": {"name": "default", "version": "1", "sha256": "cd" * 32, "prompts": ["a", "b"]},
        "grid": {"seeds": [0, 1], "scheduler": "DDIMScheduler", "num_inference_steps": 30,
                 "guidance_scale": 7.5},
    }
    card = render_model_card(
        model_name="sd-shapes", model_version="4", config=config,
        train={"run_id": "demo-1", "final_loss": 0.1234567, "seconds": 12.5, "device": "cuda",
               "base_model": {"sha256": "ef" * 32}, "dataset": {"train_samples": 216}},
        evaluation=report,
        dataset={"name": "shapes", "version": "0123456789abcdef", "uri": "s3://b/datasets/shapes/x",
                 "ingest": {"accepted": 240, "quarantined": 7}, "verdict": {"passed": True},
                 "datacard": DATACARD},
        lineage={"MLflow run": "abc", "sd_pipeline.git_commit": "f00d"},
    )

    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert front["license"] == "creativeml-openrail-m"
    assert front["datasets"] == ["shapes"] and "lora" in front["tags"]
    assert "# sd-shapes version 4" in card
    assert "| holdout_loss | 0.41 | 0.45 |" in card and "champion v3" in card
    assert "clip `s3://models/clip-vit-l14`" in card
    assert "- unsafe_rate: evaluate.safety_checker is not set" in card
    assert "240 samples accepted, 7 quarantined" in card and "Quality gate: passed" in card
    assert "### Known limitations" in card and "Red is over-represented" in card
    assert "Coloured shapes." not in card  # only the limitation and bias sections are taken
    assert "| sd_pipeline.git_commit | `f00d` |" in card


def test_git_commit_comes_from_the_environment_or_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from sd_pipeline.registry.lineage import git_commit

    monkeypatch.setenv("SD_PIPELINE_GIT_COMMIT", "abc123")
    assert git_commit(tmp_path)["sd_pipeline.git_commit"] == "abc123"
    monkeypatch.delenv("SD_PIPELINE_GIT_COMMIT")
    assert git_commit(tmp_path) == {}  # not a checkout, no variable: nothing is claimed

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (tmp_path / "f.txt").write_text("1")
    for args in (["init", "-q"], ["add", "f.txt"], ["commit", "-qm", "one"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == {"sd_pipeline.git_commit": sha, "sd_pipeline.git_dirty": "false",
                                    "mlflow.source.git.commit": sha}
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path)["sd_pipeline.git_dirty"] == "true"
