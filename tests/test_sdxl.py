"""SDXL next to SD 1.x: captions encode as diffusers' pipelines encode them, and an SDXL run is
evaluated and served with SDXL's pipeline (LoRA or full UNet on top of the base)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image, ImageDraw  # noqa: E402

from sd_pipeline.config import PipelineConfig, parse_config  # noqa: E402
from sd_pipeline.ingest.shards import ShardSample, write_shard  # noqa: E402
from sd_pipeline.ingest.versions import latest_key, version_prefix  # noqa: E402
from sd_pipeline.models.base import SDComponents, load_components, model_digest  # noqa: E402
from sd_pipeline.models.conditioning import added_conditions, encode_prompts  # noqa: E402
from sd_pipeline.models.tiny import build_tiny_sd, build_tiny_sdxl  # noqa: E402
from sd_pipeline.storage import LocalStore  # noqa: E402

CAPTIONS = [f"a {fg} {shape} on a {bg} background" for shape in ("circle", "square")
            for fg in ("red", "blue", "yellow") for bg in ("white", "black")]
PROMPTS = ["a red circle on a white background", "a blue square", ""]
DATASET, VERSION = "shapes", "00000000000000a1"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd": build_tiny_sd(root / "tiny-sd", CAPTIONS),
            "sdxl": build_tiny_sdxl(root / "tiny-sdxl", CAPTIONS)}


@pytest.fixture(scope="module")
def xl(models: dict[str, Path]) -> SDComponents:
    parts = load_components(models["sdxl"], dtype=torch.float32)
    parts.freeze(torch.device("cpu"))
    return parts


def sizes(n: int, h: int = 64, w: int = 64) -> dict[str, Any]:
    return {"original_sizes": torch.tensor([[h, w]] * n),
            "crops_top_left": torch.zeros(n, 2, dtype=torch.long), "target_size": (64, 64)}


def unet_step(
    parts: SDComponents, hidden: torch.Tensor, added: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    latents = torch.randn(len(hidden), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return parts.unet(latents, torch.full((len(hidden),), 500), encoder_hidden_states=hidden,
                          added_cond_kwargs=added).sample


# -- conditioning -------------------------------------------------------------------------


def test_sd_captions_encode_to_what_its_unet_takes(models: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    parts = load_components(models["sd"], dtype=torch.float32)
    cond = encode_prompts(parts, PROMPTS, batch_size=2)

    assert cond.pooled is None and not parts.is_sdxl
    assert cond.hidden.shape == (3, parts.tokenizer.model_max_length, parts.unet.config.cross_attention_dim)
    assert cond.hidden.dtype == torch.float32 and cond.hidden.device.type == "cpu"
    assert added_conditions(parts, None, **sizes(3)) is None
    assert unet_step(parts, cond.hidden, None).shape == (3, 4, 8, 8)
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], use_safetensors=True)
    reference, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.hidden, reference, rtol=0, atol=1e-6)


def test_sdxl_captions_encode_exactly_as_the_sdxl_pipeline_does(
    models: dict[str, Path], xl: SDComponents
) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"], use_safetensors=True,
                                                     add_watermarker=False)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False)

    cond = encode_prompts(xl, PROMPTS)
    assert torch.equal(cond.hidden, hidden) and cond.pooled is not None and torch.equal(cond.pooled, pooled)
    # Both encoders' penultimate states side by side, the first encoder's first: [3, 32, 32 + 48].
    widths = (xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size)  # type: ignore[union-attr]
    assert cond.hidden.shape == (3, 32, sum(widths)) and widths[0] != widths[1]
    assert cond.pooled.shape == (3, xl.text_encoder_2.config.projection_dim)  # type: ignore[union-attr]
    batched = encode_prompts(xl, PROMPTS, batch_size=2)  # batch edges change nothing but rounding
    torch.testing.assert_close(batched.hidden, cond.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.pooled, cond.pooled, rtol=0, atol=1e-5)


def test_sdxl_added_conditions_feed_the_unet(xl: SDComponents) -> None:
    cond = encode_prompts(xl, PROMPTS)
    added = added_conditions(xl, cond.pooled, original_sizes=torch.tensor([[512, 384], [64, 64], [100, 80]]),
                             crops_top_left=torch.tensor([[0, 8], [0, 0], [4, 2]]), target_size=(64, 48))
    assert added is not None and added["text_embeds"] is cond.pooled
    assert added["time_ids"].tolist() == [[512, 384, 0, 8, 64, 48], [64, 64, 0, 0, 64, 48],
                                          [100, 80, 4, 2, 64, 48]]
    assert added["time_ids"].dtype == cond.pooled.dtype  # type: ignore[union-attr]
    out = unet_step(xl, cond.hidden, added)
    assert out.shape == (3, 4, 8, 8)
    # The size ids really condition the UNet: other sizes, other prediction.
    assert not torch.equal(out, unet_step(xl, cond.hidden, added_conditions(xl, cond.pooled, **sizes(3))))

    with pytest.raises(ValueError, match="pooled is None but the model is SDXL"):
        added_conditions(xl, None, **sizes(3))
    with pytest.raises(ValueError, match=r"original_sizes has shape \(2, 2\); .* shape \(3, 2\)"):
        added_conditions(xl, cond.pooled, **sizes(2) | {"crops_top_left": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="must come from this model's text_encoder_2"):
        added_conditions(xl, cond.hidden[:, 0, :], **sizes(3))  # a hidden state is not the pooled embedding
    with pytest.raises(ValueError, match="captions is empty"):
        encode_prompts(xl, [])


# -- evaluation and serving -------------------------------------------------------------


def lora_weights(base: Path, out: Path) -> Path:
    """A LoRA on the base UNet saved as the trainer saves one, with non-zero B so it shows."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
    return out


def full_weights(base: Path, out: Path) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.mul_(1.5)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def publish_run(store: LocalStore, run_id: str, base: Path, method: str, weights: Path) -> None:
    """A run's final/ as the train stage publishes it: weights + metadata.json, committed."""
    (weights / "metadata.json").write_text(json.dumps({
        "base_model": {"uri": str(base), "sha256": model_digest(base)},
        "method": method, "prediction_type": "epsilon",
    }))
    store.upload_dir(weights, f"runs/{run_id}/final")
    store.commit(f"runs/{run_id}/final", {"method": method})


def write_dataset(store: LocalStore) -> None:
    """Four training and two held-out pictures, one dataset version."""
    samples = []
    for i, caption in enumerate(CAPTIONS[:6]):
        img = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(220, 30, 30 + 40 * i))
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        split = "train" if i < 4 else "holdout"
        samples.append(ShardSample(key=f"{i:06d}", image=buf.getvalue(), caption=caption,
                                   meta={"split": split}))
    prefix = version_prefix(DATASET, VERSION)
    store.put_bytes(f"{prefix}/shards/shard-000000.tar", write_shard(samples))
    store.commit(prefix, {"samples": len(samples)})
    store.write_pointer(latest_key(DATASET), VERSION)


def eval_config(root: Path, model: Path) -> PipelineConfig:
    return parse_config({}, {
        "storage.root": f"file://{root / 'store'}",
        "model.base": str(model),
        "dataset.name": DATASET,
        "dataset.version": VERSION,
        "dataset.resolution": 64,
        "evaluate.loss_timesteps": [200, 700],
        "evaluate.prompts": ["a red circle on a white background", "a blue square"],
        "evaluate.seeds": [0, 1],
        "evaluate.num_inference_steps": 2,
        "evaluate.compare_with_champion": False,
    }, env={"SD_PIPELINE_HOME": str(root / "home")})


def test_sdxl_run_weights_go_into_an_sdxl_pipeline(models: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from sd_pipeline.evaluate.evaluate import _sample, _sampling_pipeline, _tuned_pipeline

    base = models["sdxl"]
    store = LocalStore(tmp_path / "store")
    publish_run(store, "xl-lora", base, "lora", lora_weights(base, tmp_path / "lora"))
    publish_run(store, "xl-full", base, "full", full_weights(base, tmp_path / "full"))

    def picture(pipe: Any) -> list[int]:
        return list(_sample(pipe, "a red circle", 0, 64, 2, 5.0).getdata())

    parts = load_components(base, dtype=torch.float32)
    parts.freeze(torch.device("cpu"))
    plain = _sampling_pipeline(parts, parts.unet, DDIMScheduler.from_config(parts.noise_scheduler.config))
    plain.set_progress_bar_config(disable=True)
    before = picture(plain)
    full = _tuned_pipeline(store, "xl-full", "full", parts, torch.device("cpu"))
    assert isinstance(full, StableDiffusionXLPipeline) and full.unet is not parts.unet
    assert picture(full) != before
    lora = _tuned_pipeline(store, "xl-lora", "lora", parts, torch.device("cpu"))
    assert isinstance(lora, StableDiffusionXLPipeline) and lora.unet is parts.unet  # loaded in place
    assert isinstance(lora.scheduler, DDIMScheduler)
    assert picture(lora) != before

    store.delete_prefix("runs/xl-lora/final/pytorch_lora_weights.safetensors")
    with pytest.raises(FileNotFoundError, match="LoRA run but .* holds no pytorch_lora_weights.safetensors"):
        _tuned_pipeline(store, "xl-lora", "lora", load_components(base), torch.device("cpu"))


def test_a_full_run_with_a_trained_text_encoder_brings_it_along(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import CLIPTextModel

    from sd_pipeline.evaluate.evaluate import _tuned_pipeline

    base = models["sd"]
    weights = full_weights(base, tmp_path / "full")
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    with torch.no_grad():
        [bias] = [p for n, p in encoder.named_parameters() if n.endswith("final_layer_norm.bias")]
        bias.add_(1.0)  # shifts every output state by exactly 1
    encoder.save_pretrained(weights / "text_encoder")
    store = LocalStore(tmp_path / "store")
    publish_run(store, "sd-full-te", base, "full", weights)

    parts = load_components(base, dtype=torch.float32)
    before = encode_prompts(parts, PROMPTS).hidden
    pipe = _tuned_pipeline(store, "sd-full-te", "full", parts, torch.device("cpu"))
    assert pipe.text_encoder is parts.text_encoder
    torch.testing.assert_close(encode_prompts(parts, PROMPTS).hidden, before + 1.0)


def test_evaluate_stage_draws_an_sdxl_runs_grid(models: dict[str, Path], tmp_path: Path) -> None:
    from sd_pipeline.evaluate.evaluate import evaluate

    base = models["sdxl"]
    store = LocalStore(tmp_path / "store")
    write_dataset(store)
    publish_run(store, "xl-run", base, "lora", lora_weights(base, tmp_path / "lora"))

    result = evaluate(eval_config(tmp_path, base), "xl-run")

    grid = Image.open(io.BytesIO(store.get_bytes("runs/xl-run/eval/grid.png")))
    assert grid.size == (2 * 64, 2 * 64)  # 2 seeds x 2 prompts
    assert len(set(grid.getdata())) > 1
    metrics = result["metrics"]
    assert metrics["holdout_samples"] == 2.0
    assert metrics["holdout_loss"] > 0 and metrics["holdout_loss"] != metrics["base_holdout_loss"]  # LoRA in
    assert store.get_json("runs/xl-run/eval/metrics.json")["metrics"] == metrics


def test_registered_sdxl_lora_loads_and_draws(models: dict[str, Path], tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    mlflow = pytest.importorskip("mlflow")
    from diffusers import StableDiffusionXLPipeline

    from sd_pipeline.config import RegistryConfig
    from sd_pipeline.registry.tracking import log_and_register

    base = models["sdxl"]
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                         artifact_location=str(tmp_path / "mlartifacts"), experiment="sdxl-test",
                         model_name="sdxl-test", alias="challenger")
    log_and_register(cfg, run_id="xl-lora-run", params={"train": {"method": "lora"}}, metrics={},
                     artifacts={}, model_dir=lora_weights(base, tmp_path / "lora"), base_model_dir=base,
                     tags={}, dataset={"name": DATASET, "version": VERSION, "uri": "file:///data/x"})

    mlflow.set_tracking_uri(cfg.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/sdxl-test@challenger")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [0], "num_inference_steps": [2]}))
    served = Image.open(io.BytesIO(out["image"][0]))
    assert served.format == "PNG" and served.size == (64, 64)

    plain = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    untuned = plain("a red circle", num_inference_steps=2, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert list(served.convert("RGB").getdata()) != list(untuned.convert("RGB").getdata())  # the LoRA shows


def test_serving_refuses_a_pipeline_it_does_not_know(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sd_pipeline.registry.pyfunc_model import pipeline_class

    assert pipeline_class(models["sdxl"]) is StableDiffusionXLPipeline
    assert pipeline_class(models["sd"]) is StableDiffusionPipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="is a FluxPipeline .* SDXL"):
        pipeline_class(tmp_path)
