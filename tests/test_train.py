"""Training, as a user sees it: a run on a committed dataset version publishes loadable weights."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image, ImageDraw  # noqa: E402

from sd_pipeline.config import PipelineConfig, parse_config  # noqa: E402
from sd_pipeline.ingest.shards import ShardSample, write_shard  # noqa: E402
from sd_pipeline.ingest.versions import latest_key, version_prefix  # noqa: E402
from sd_pipeline.models.tiny import build_tiny_sd  # noqa: E402
from sd_pipeline.storage import LocalStore, Store  # noqa: E402
from sd_pipeline.train.buckets import BatchSchedule  # noqa: E402
from sd_pipeline.train.checkpoints import committed_steps  # noqa: E402
from sd_pipeline.train.trainer import train  # noqa: E402

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "yellow": (240, 220, 40),
          "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square")
DATASET, VERSION = "shapes", "v-test"


def shape_jpeg(shape: str, fg: str, bg: str, size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), COLORS[bg])
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[fg])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def shape_samples(n_train: int = 8, n_holdout: int = 4) -> list[ShardSample]:
    samples = []
    fgs, bgs = ("red", "blue", "yellow"), ("white", "black")
    for i in range(n_train + n_holdout):
        shape, fg, bg = SHAPES[i % 2], fgs[i % 3], bgs[(i // 2) % 2]
        samples.append(ShardSample(
            key=f"{i:06d}",
            image=shape_jpeg(shape, fg, bg),
            caption=f"a {fg} {shape} on a {bg} background",
            meta={"split": "train" if i < n_train else "holdout"},
        ))
    return samples


def write_dataset(store: Store, samples: list[ShardSample], version: str = VERSION) -> None:
    prefix = version_prefix(DATASET, version)
    store.put_bytes(f"{prefix}/shards/shard-000000.tar", write_shard(samples))
    store.commit(prefix, {"samples": len(samples)})
    store.write_pointer(latest_key(DATASET), version)


def make_config(root: Path, model: Path, **overrides: Any) -> PipelineConfig:
    """A config for a 64 px tiny run in ``root``: few steps, two prompts, two seeds."""
    base = {
        "storage.root": f"file://{root / 'store'}",
        "model.base": str(model),
        "dataset.name": DATASET,
        "dataset.resolution": 64,
        "train.steps": 4,
        "train.batch_size": 4,
        "train.learning_rate": 1e-3,
        "train.lora_rank": 4,
        "evaluate.prompts": ["a red circle on a white background", "a blue square"],
        "evaluate.seeds": [0, 1],
        "evaluate.num_inference_steps": 2,
        "evaluate.loss_timesteps": [200, 700],
    }
    return parse_config({}, {**base, **overrides}, env={"SD_PIPELINE_HOME": str(root / "home")})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    captions = [s.caption for s in shape_samples()]
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", captions, seed=0)


@pytest.fixture()
def workspace(tmp_path: Path, tiny_model: Path) -> tuple[PipelineConfig, LocalStore]:
    config = make_config(tmp_path, tiny_model)
    store = LocalStore(tmp_path / "store")
    write_dataset(store, shape_samples())
    return config, store


def unet_output(pipe: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 32, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=cond).sample


def test_batches_are_seeded_single_bucket_epoch_shuffles() -> None:
    schedule = BatchSchedule([8, 3, 0, 6], batch_size=4, seed=0)
    assert schedule.per_epoch == 2 + 1 + 0 + 2
    epoch = [schedule.batch(step) for step in range(1, schedule.per_epoch + 1)]
    seen = {(b, i) for b, rows in epoch for i in rows}
    assert seen == {(b, i) for b, n in enumerate([8, 3, 0, 6]) for i in range(n)}  # each sample once
    assert all(len(rows) <= 4 for _, rows in epoch)
    assert schedule.small_buckets() == {1: 3}  # reported, not dropped
    again = BatchSchedule([8, 3, 0, 6], batch_size=4, seed=0)
    assert [again.batch(s) for s in range(1, 12)] == [schedule.batch(s) for s in range(1, 12)]
    other = BatchSchedule([8, 3, 0, 6], batch_size=4, seed=1)
    assert [other.batch(s) for s in range(1, 6)] != epoch
    assert schedule.batch(schedule.per_epoch + 1) != schedule.batch(1) or len(epoch) == 1  # new shuffle


def test_lora_run_publishes_weights_that_change_the_unet(
    workspace: tuple[PipelineConfig, LocalStore], tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from diffusers import StableDiffusionPipeline

    config, store = workspace
    with caplog.at_level(logging.INFO, logger="sd_pipeline.train"):
        result = train(config, "run-lora")
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored

    assert result["method"] == "lora" and result["steps"] == 4
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    assert result["final_uri"] == store.uri("runs/run-lora/final")
    assert store.is_committed("runs/run-lora/final")
    meta = store.get_json("runs/run-lora/final/metadata.json")
    assert meta["dataset"] == {"name": DATASET, "version": VERSION, "versions": [VERSION],
                               "train_samples": 8, "buckets": {"64x64": 8}}
    assert not meta["cache"]["hit"]  # the first run built the latent cache
    assert len(meta["base_model"]["sha256"]) == 64
    assert meta["config"]["train"]["steps"] == 4
    assert any("trained run run-lora" in r.getMessage() for r in caplog.records)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    before = unet_output(pipe)
    pipe.load_lora_weights(store.local_path("runs/run-lora/final"))
    assert not torch.allclose(before, unet_output(pipe))

    # Idempotent: a second call returns the published result without training.
    assert train(config, "run-lora") == result


def test_full_run_saves_a_loadable_unet(tmp_path: Path, tiny_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    config = make_config(tmp_path, tiny_model, **{"train.method": "full", "train.steps": 2})
    store = LocalStore(tmp_path / "store")
    write_dataset(store, shape_samples())
    result = train(config, "run-full")

    assert result["method"] == "full"
    unet = UNet2DConditionModel.from_pretrained(store.local_path("runs/run-full/final/unet"))
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed


def test_resumed_run_matches_an_uninterrupted_one(
    workspace: tuple[PipelineConfig, LocalStore],
) -> None:
    config, store = workspace
    config = config.model_copy(update={
        "train": config.train.model_copy(update={"steps": 6, "checkpoint_every": 2})
    })
    train(config, "run-ckpt")
    assert committed_steps(store, "run-ckpt") == [4, 6]  # only the newest two are kept
    weights = "runs/run-ckpt/final/pytorch_lora_weights.safetensors"
    uninterrupted = store.get_bytes(weights)
    meta = store.get_json("runs/run-ckpt/final/metadata.json")

    # A crash after the step-4 checkpoint: no final, no step-6 checkpoint.
    store.delete_prefix("runs/run-ckpt/final")
    store.delete_prefix("runs/run-ckpt/checkpoints/step-6")
    resumed = train(config, "run-ckpt")

    from safetensors.torch import load

    a, b = load(uninterrupted), load(store.get_bytes(weights))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["final_loss"] == pytest.approx(meta["final_loss"], rel=1e-5)
    assert store.get_json("runs/run-ckpt/final/metadata.json")["resumed_from_step"] == 4


def test_reusing_a_run_id_with_another_config_is_refused(
    workspace: tuple[PipelineConfig, LocalStore],
) -> None:
    config, _ = workspace
    config = config.model_copy(update={"train": config.train.model_copy(update={"steps": 1})})
    train(config, "run-once")
    changed = config.model_copy(update={
        "train": config.train.model_copy(update={"learning_rate": 5e-4})
    })
    with pytest.raises(ValueError, match="use a new run id"):
        train(changed, "run-once")


def test_a_version_without_training_samples_is_explained(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = make_config(tmp_path, tiny_model)
    store = LocalStore(tmp_path / "store")
    holdout_only = [s for s in shape_samples() if s.meta["split"] == "holdout"]
    write_dataset(store, holdout_only)
    with pytest.raises(ValueError, match="no samples with split 'train'"):
        train(config, "run-empty")
    assert json.loads(json.dumps(store.list("runs"))) == []
