"""The training engine's promises: cache reuse, buckets, features, SDXL, and surviving SIGKILL."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from test_train import (  # noqa: E402
    VERSION,
    make_config,
    shape_jpeg,
    shape_samples,
    write_dataset,
)

from sd_pipeline.config import PipelineConfig  # noqa: E402
from sd_pipeline.ingest.shards import ShardSample  # noqa: E402
from sd_pipeline.models.tiny import build_tiny_sd, build_tiny_sdxl  # noqa: E402
from sd_pipeline.storage import LocalStore  # noqa: E402
from sd_pipeline.train.cache import buckets_for, ensure_cache  # noqa: E402
from sd_pipeline.train.checkpoints import committed_steps  # noqa: E402
from sd_pipeline.train.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("m") / "tiny-sd", [s.caption for s in shape_samples()])


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("m") / "tiny-sdxl", [s.caption for s in shape_samples()])


def workspace(tmp_path: Path, model: Path, samples: list[ShardSample] | None = None,
              **overrides: Any) -> tuple[PipelineConfig, LocalStore]:
    config = make_config(tmp_path, model, **overrides)
    store = LocalStore(tmp_path / "store")
    write_dataset(store, samples if samples is not None else shape_samples())
    return config, store


def weights(store: LocalStore, run_id: str) -> dict[str, Any]:
    from safetensors.torch import load

    final = store.local_path(f"runs/{run_id}/final")
    files = sorted(final.rglob("*.safetensors"))
    assert files, f"no weights under {final}"
    out: dict[str, Any] = {}
    for f in files:
        out.update({f"{f.name}:{k}": v for k, v in load(f.read_bytes()).items()})
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"weights differ by up to {worst}"


def test_second_run_reuses_the_cache_and_never_encodes(
    tmp_path: Path, tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from transformers import CLIPTextModel

    config, store = workspace(tmp_path, tiny_sd, **{"train.steps": 2})
    first = train(config, "run-a")
    meta_a = store.get_json("runs/run-a/final/metadata.json")
    assert meta_a["cache"]["hit"] is False and first["steps"] == 2

    calls = {"vae.encode": 0, "text_encoder": 0}
    vae_encode, text_forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counting_encode(self: Any, *a: Any, **k: Any) -> Any:
        calls["vae.encode"] += 1
        return vae_encode(self, *a, **k)

    def counting_forward(self: Any, *a: Any, **k: Any) -> Any:
        calls["text_encoder"] += 1
        return text_forward(self, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(CLIPTextModel, "forward", counting_forward)
    other = config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": 3e-4})})
    train(other, "run-b")
    meta_b = store.get_json("runs/run-b/final/metadata.json")
    assert meta_b["cache"]["hit"] is True
    assert meta_b["cache"]["fingerprint"] == meta_a["cache"]["fingerprint"]
    assert calls == {"vae.encode": 0, "text_encoder": 0}

    # Another resolution is another cache: the spy sees the encoders run.
    resized = other.model_copy(update={"dataset": other.dataset.model_copy(update={"resolution": 32})})
    train(resized, "run-c")
    assert calls["vae.encode"] > 0 and calls["text_encoder"] > 0


def test_loss_falls_on_a_fixed_batch(tmp_path: Path, tiny_sd: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from sd_pipeline.evaluate.evaluate import holdout_losses

    four = [s for s in shape_samples(4, 0)]
    config, store = workspace(tmp_path, tiny_sd, four, **{
        "train.method": "full", "train.steps": 30, "train.batch_size": 4, "train.learning_rate": 1e-3,
    })
    train(config, "run-fit")
    cache, _ = ensure_cache(config, store, [VERSION], tiny_sd, splits=("train",))
    batch = cache.split("train")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    vae_config = {"scaling_factor": 0.18215}
    text = (cache.captions.hidden, cache.captions.pooled)
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    after = UNet2DConditionModel.from_pretrained(store.local_path("runs/run-fit/final/unet"))
    loss_before = holdout_losses(before, batch, text, scheduler, vae_config, [300, 600], 0)
    loss_after = holdout_losses(after, batch, text, scheduler, vae_config, [300, 600], 0)
    assert sum(loss_after.values()) < 0.8 * sum(loss_before.values()), (loss_before, loss_after)


def test_aspect_ratio_buckets_keep_every_image(tmp_path: Path, tiny_sd: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    samples = shape_samples(8, 2)
    wide = []
    for i, (s, fg) in enumerate(zip(samples[:3], ("red", "blue", "yellow"), strict=True)):
        # three distinct landscape images: their own bucket (equal images would be deduplicated)
        img = Image.open(io.BytesIO(shape_jpeg("circle", fg, "white", size=96))).crop((0, 24, 96, 72))
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        wide.append(ShardSample(key=f"w{i}", image=buf.getvalue(), caption=s.caption, meta=s.meta))
    config, store = workspace(tmp_path, tiny_sd, samples + wide, **{
        "train.bucket_step": 16, "train.steps": 3, "train.batch_size": 4,
    })
    buckets = {b.name for b in buckets_for(config)}
    assert "64x64" in buckets and "48x80" in buckets
    train(config, "run-buckets")
    meta = store.get_json("runs/run-buckets/final/metadata.json")
    assert meta["dataset"]["buckets"] == {"64x64": 8, "48x80": 3}
    assert any("smaller than a batch" in r.getMessage() and "48x80" in r.getMessage() for r in caplog.records)


def test_every_training_feature_resumes_exactly(tmp_path: Path, tiny_sd: Path) -> None:
    features = {
        "train.steps": 8, "train.checkpoint_every": 3, "train.checkpoints_keep": 3,
        "train.ema": True, "train.ema_decay": 0.9, "train.lr_scheduler": "cosine",
        "train.lr_warmup_steps": 2, "train.gradient_accumulation_steps": 2, "train.snr_gamma": 5.0,
        "train.noise_offset": 0.05, "train.caption_dropout": 0.2, "train.max_grad_norm": 0.5,
    }
    config, store = workspace(tmp_path, tiny_sd, **features)
    train(config, "run-feat")
    assert committed_steps(store, "run-feat") == [3, 6]
    uninterrupted = weights(store, "run-feat")
    meta = store.get_json("runs/run-feat/final/metadata.json")
    assert meta["ema"] is True and meta["effective_batch_size"] == 8

    store.delete_prefix("runs/run-feat/final")  # a crash after the step-6 checkpoint
    train(config, "run-feat")
    assert store.get_json("runs/run-feat/final/metadata.json")["resumed_from_step"] == 6
    assert_same(uninterrupted, weights(store, "run-feat"))


def test_sigkill_after_a_checkpoint_then_rerun_equals_uninterrupted(tmp_path: Path, tiny_sd: Path) -> None:
    """The promise a preemptible GPU pod relies on: kill -9, rerun the same command, same weights."""
    config, store = workspace(tmp_path, tiny_sd, **{
        "train.method": "full", "train.steps": 80, "train.checkpoint_every": 10, "train.batch_size": 2,
        "train.ema": True, "train.lr_scheduler": "linear", "train.lr_warmup_steps": 5,
    })
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, "SD_PIPELINE_NO_PROGRESS": "1", "SD_PIPELINE_HOME": str(tmp_path / "home")}

    def command(run_id: str) -> list[str]:
        return [sys.executable, "-m", "sd_pipeline.cli", "train", "--config", str(config_file),
                "--run-id", run_id]

    subprocess.run(command("straight"), env=env, check=True, capture_output=True, timeout=600)
    straight = weights(store, "straight")

    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not committed_steps(store, "killed"):
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr.read()!r}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not store.is_committed("runs/killed/final"), "the run finished before the kill; make it longer"
    resumed_from = committed_steps(store, "killed")[-1]

    subprocess.run(command("killed"), env=env, check=True, capture_output=True, timeout=600)
    meta = store.get_json("runs/killed/final/metadata.json")
    assert meta["resumed_from_step"] == resumed_from > 0
    assert_same(straight, weights(store, "killed"))


def test_sdxl_trains_lora_and_full_and_the_lora_loads(tmp_path: Path, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    config, store = workspace(tmp_path, tiny_sdxl, **{"train.steps": 3, "train.learning_rate": 1e-2})
    result = train(config, "xl-lora")
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    full = config.model_copy(update={"train": config.train.model_copy(update={"method": "full"})})
    train(full, "xl-full")
    assert store.get_json("runs/xl-full/final/metadata.json")["weights"] == "unet"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def sample() -> Any:
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(store.local_path("runs/xl-lora/final"))
    assert not torch.allclose(before, sample())


def test_text_encoder_lora_is_saved_and_loads(tmp_path: Path, tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline

    config, store = workspace(tmp_path, tiny_sd, **{"train.steps": 2, "train.train_text_encoder": True})
    train(config, "te-lora")
    keys = weights(store, "te-lora")
    assert any(":text_encoder." in k for k in keys) and any(":unet." in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.load_lora_weights(store.local_path("runs/te-lora/final"))


def test_impossible_settings_fail_before_loading(tmp_path: Path, tiny_sd: Path) -> None:
    config, _ = workspace(tmp_path, tiny_sd, **{"train.mixed_precision": "bf16"})
    with pytest.raises(ValueError, match="mixed_precision='bf16' needs a GPU"):
        train(config, "bf16-on-cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        config, _ = workspace(tmp_path / "b", tiny_sd, **{"train.optimizer": "adamw8bit"})
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            train(config, "eight-bit")


def test_a_config_that_cannot_fit_is_refused_with_what_would(tiny_sd: Path) -> None:
    from sd_pipeline.config import TrainConfig
    from sd_pipeline.train.memory import GIB, check_fits, estimate

    full = TrainConfig(method="full", batch_size=64)
    est = estimate(tiny_sd, full, 1024, "bf16")
    lora = estimate(tiny_sd, TrainConfig(method="lora", batch_size=64), 1024, "bf16")
    assert lora.trainable < est.trainable / 10  # LoRA trains a sliver of the UNet
    checkpointed = TrainConfig(method="full", batch_size=64, gradient_checkpointing=True)
    light = estimate(tiny_sd, checkpointed, 1024, "bf16")
    assert light.activations_per_sample < est.activations_per_sample
    capacity = est.weights + est.trainable + est.optimizer + 10 * est.activations_per_sample
    with pytest.raises(MemoryError, match=r"lower train\.batch_size to 10 .*gradient_checkpointing"):
        check_fits(est, capacity, "training tiny at 1024 px")
    check_fits(est, est.total + GIB, "training tiny at 1024 px")  # fits: no error


def test_sharded_rows_read_the_rows_asked_for_across_shards() -> None:
    from sd_pipeline.train.cache import ShardedRows

    whole = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)
    rows = ShardedRows([whole[:3], whole[3:5], whole[5:]])
    idx = torch.tensor([6, 0, 4, 3, 2, 6])
    assert len(rows) == 7 and rows.shape == (7, 2)
    assert torch.equal(rows[idx], whole[idx])
    assert torch.equal(rows[:], whole) and torch.equal(rows[[1]], whole[[1]])


def test_a_cache_in_s3_is_mapped_from_one_local_copy(
    tmp_path: Path, tiny_sd: Path, bucket: str, home: Path
) -> None:
    from safetensors.torch import load

    from sd_pipeline.models.base import default_cache_dir
    from sd_pipeline.storage import Store

    config = make_config(tmp_path, tiny_sd, **{"storage.root": f"s3://{bucket}/store"})
    store = Store.from_uri(config.storage.root)
    write_dataset(store, shape_samples())
    first, summary = ensure_cache(config, store, [VERSION], tiny_sd, splits=("train",))
    assert summary["hit"] is False
    copies = list((default_cache_dir().parent / "latents").iterdir())
    assert len(copies) == 1 and (copies[0] / ".complete").is_file()
    stamp = (copies[0] / ".complete").stat().st_mtime_ns

    again, summary = ensure_cache(config, store, [VERSION], tiny_sd, splits=("train",))
    assert summary["hit"] is True
    assert (copies[0] / ".complete").stat().st_mtime_ns == stamp, "the local copy was downloaded again"
    # What the mapped rows hold is what the store holds.
    prefix = f"cache/{config.dataset.name}/{summary['fingerprint']}"
    for data in again.split("train"):
        entry = again.index["splits"]["train"][data.bucket.name]
        stored = torch.cat([load(store.get_bytes(f"{prefix}/train/{s}"))["mean"] for s in entry["shards"]])
        assert torch.equal(data.mean[:], stored)
    # and a run trains from it
    assert train(config, "from-s3")["steps"] == config.train.steps


def test_a_non_finite_loss_is_refused_by_the_step_it_happened_at() -> None:
    """Losses are read in batches; a NaN among them still names its own step."""
    from sd_pipeline.config import TrainConfig
    from sd_pipeline.train.trainer import _Run

    run = _Run.__new__(_Run)
    run.run_id, run.tc = "nan-run", TrainConfig(learning_rate=0.5)
    grad = torch.tensor(1.0)
    finite = [(1, torch.tensor(0.5), grad), (2, torch.tensor(0.25), grad)]
    recent, loss, norm = run._read_losses(list(finite), [0.75])
    assert recent == [0.75, 0.5, 0.25] and (loss, norm) == (0.25, 1.0)
    pending = [*finite, (3, torch.tensor(float("nan")), grad), (4, torch.tensor(0.1), grad)]
    refused = r"at step 3 of run nan-run; lower train\.learning_rate \(now 0\.5\)"
    with pytest.raises(FloatingPointError, match=refused):
        run._read_losses(pending, [])


def test_the_optimizer_is_torchs_fused_adamw() -> None:
    from sd_pipeline.config import TrainConfig
    from sd_pipeline.train.trainer import _optimizer

    opt = _optimizer(TrainConfig(learning_rate=1e-3), [torch.nn.Parameter(torch.ones(4))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


def test_compiled_training_learns_what_eager_training_learns(tmp_path: Path, tiny_sd: Path) -> None:
    """train.compile changes how the step runs, not what it learns; and dynamo really compiles."""
    from torch._dynamo.utils import counters

    config, store = workspace(tmp_path, tiny_sd, **{"train.method": "lora", "train.steps": 4})
    train(config, "eager")
    compiled = config.model_copy(update={"train": config.train.model_copy(update={"compile": True})})
    graphs = counters["stats"]["unique_graphs"]
    train(compiled, "compiled")
    assert counters["stats"]["unique_graphs"] > graphs, "train.compile did not compile anything"
    eager_w, compiled_w = weights(store, "eager"), weights(store, "compiled")
    assert eager_w.keys() == compiled_w.keys()
    worst = max(float((eager_w[k] - compiled_w[k]).abs().max()) for k in eager_w)
    assert worst <= 1e-4, f"compiled training drifted from eager by {worst}"
    meta = store.get_json("runs/compiled/final/metadata.json")
    assert meta["config"]["train"]["compile"] is True


def test_two_processes_train_one_run_with_ddp(tmp_path: Path, tiny_sd: Path) -> None:
    """What `accelerate launch` does on a multi-GPU pod, on CPU: two ranks, gloo, one result."""
    config, store = workspace(tmp_path, tiny_sd, **{
        "train.steps": 4, "train.batch_size": 2, "train.checkpoint_every": 2,
    })
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    torchrun = Path(sys.executable).with_name("torchrun")
    from conftest import free_port

    out = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "sd_pipeline.cli",
         "train", "--config", str(config_file), "--run-id", "ddp"],
        env={**os.environ, "SD_PIPELINE_NO_PROGRESS": "1", "SD_PIPELINE_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    meta = store.get_json("runs/ddp/final/metadata.json")
    assert meta["processes"] == 2 and meta["effective_batch_size"] == 4
    assert out.stdout.count('"run_id": "ddp"') == 1  # only rank 0 reports
    assert committed_steps(store, "ddp") == [2, 4]


def test_metrics_and_validation_images_reach_the_runs_mlflow_run(tmp_path: Path, tiny_sd: Path) -> None:
    from mlflow import MlflowClient

    from sd_pipeline.registry.tracking import RUN_TAG

    config, _ = workspace(tmp_path, tiny_sd, **{
        "train.steps": 4, "train.log_every": 2, "train.validate_every": 4,
    })
    train(config, "watched")
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    experiment = client.get_experiment_by_name(config.registry.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'watched'")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "train.loss")
    assert [m.step for m in history] == [2, 4]
    for name in ("train.lr", "train.grad_norm", "train.samples_per_s", "train.memory_bytes"):
        assert client.get_metric_history(run_id, name), name
    images = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert images == ["validation/step-0000004.png"]
    png = Image.open(client.download_artifacts(run_id, images[0], str(tmp_path)))
    assert png.size == (2 * 64, 64)  # one image per evaluation prompt (two here), 64 px
