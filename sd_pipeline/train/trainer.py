"""The train stage: fine-tune a base model's UNet (LoRA or full) on one dataset version.

The frozen VAE and text encoder run once over the data; each step then draws latents,
noise and timesteps from generators seeded by (seed, step), so a run resumed from a
checkpoint retraces the uninterrupted one. Results are published under
``runs/<run_id>/final/`` with the marker written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.versions import iter_samples, resolve_version
from sd_pipeline.storage import Store
from sd_pipeline.train.checkpoints import (
    Checkpoint,
    committed_steps,
    load_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from sd_pipeline.models.base import SDComponents

log = logging.getLogger("sd_pipeline.train")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LOSS_WINDOW = 10  # final_loss is the mean of the last LOSS_WINDOW step losses


def final_prefix(run_id: str) -> str:
    return f"runs/{run_id}/final"


def train(config: PipelineConfig, run_id: str, dataset_version: str) -> dict[str, Any]:
    """Train ``run_id`` on ``dataset_version`` (or ``latest``) and publish it; idempotent.

    Returns ``run_id, final_uri, method, steps, seconds, samples_per_s, final_loss``. A run
    whose final weights are already committed is returned as is; one with committed
    checkpoints resumes from the newest.
    """
    _check_run_id(run_id)
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    version = resolve_version(store, config.dataset.name, dataset_version)
    fingerprint = training_fingerprint(config, version)
    final = final_prefix(run_id)
    if store.is_committed(final):
        return _already_trained(store, run_id, fingerprint, config.train.steps)

    import numpy as np
    import torch

    from sd_pipeline.models.base import (
        default_cache_dir,
        load_components,
        model_digest,
        resolve_base_model,
    )
    from sd_pipeline.train.encoded import EmptySplitError, encode_split

    tc = config.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_path = resolve_base_model(
        config.model.base,
        default_cache_dir(),
        endpoint_url=config.storage.endpoint_url,
    )
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    parts = load_components(base_path, dtype=torch.float32)
    if config.model.prediction_type is not None:
        parts.noise_scheduler.register_to_config(prediction_type=config.model.prediction_type)
    parts.freeze(device)

    t0 = time.perf_counter()
    try:
        data = encode_split(
            iter_samples(store, config.dataset.name, version, split="train"),
            resolution=config.dataset.resolution,
            tokenizer=parts.tokenizer,
            text_encoder=parts.text_encoder,
            vae=parts.vae,
        )
    except EmptySplitError:
        raise EmptySplitError(
            f"dataset {config.dataset.name}/{version} has no samples with split 'train'; "
            "check dataset.holdout_fraction and the ingest output"
        ) from None
    encode_seconds = time.perf_counter() - t0
    log.info("encoded %d training images and %d distinct captions in %.1f s",
             len(data), len(data.caption_embeddings), encode_seconds)

    params = _make_trainable(parts, config)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate)
    named_trainable = {n: p for n, p in parts.unet.named_parameters() if p.requires_grad}

    start, recent = _resume(store, run_id, tc.steps, fingerprint, named_trainable, optimizer)

    with _deterministic(device):
        t0 = time.perf_counter()
        parts.unet.train()
        every = max(1, tc.steps // 10)
        for step in range(start + 1, tc.steps + 1):
            loss = _train_step(parts, data, optimizer, params, step, config, device)
            recent = (recent + [loss])[-LOSS_WINDOW:]
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step} of run {run_id}; lower "
                    f"train.learning_rate (now {tc.learning_rate})"
                )
            if step % every == 0 or step == tc.steps:
                rate = (step - start) * tc.batch_size / (time.perf_counter() - t0)
                log.info("step %d/%d loss %.4f (%.1f samples/s)", step, tc.steps, loss, rate)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save_checkpoint(store, run_id, Checkpoint(
                    step=step,
                    trainable=named_trainable,
                    optimizer=optimizer.state_dict(),
                    state={"fingerprint": fingerprint, "recent_losses": recent},
                ))
        seconds = time.perf_counter() - t0

    steps_run = tc.steps - start
    summary: dict[str, Any] = {
        "run_id": run_id,
        "final_uri": store.uri(final),
        "method": tc.method,
        "steps": tc.steps,
        "seconds": round(seconds, 3),
        "samples_per_s": round(steps_run * tc.batch_size / seconds, 3) if steps_run else 0.0,
        "final_loss": float(np.mean(recent)),
    }
    metadata = {
        **summary,
        "resumed_from_step": start,
        "batch_size": tc.batch_size,
        "prediction_type": parts.noise_scheduler.config["prediction_type"],
        "fingerprint": fingerprint,
        "base_model": {
            "uri": config.model.base,
            "path": str(base_path),
            "sha256": model_digest(base_path),
        },
        "dataset": {"name": config.dataset.name, "version": version, "train_samples": len(data)},
        "config": config.model_dump(mode="json"),
        "encode_seconds": round(encode_seconds, 3),
        "device": str(device),
        "versions": _versions(),
    }
    _publish(store, final, parts, config, metadata)
    store.commit(final, summary)
    log.info(
        "trained run %s (%s) on %s/%s: %d steps in %.1f s (%.1f samples/s), final loss %.4f",
        run_id, tc.method, config.dataset.name, version, steps_run, seconds,
        summary["samples_per_s"], summary["final_loss"],
    )
    return summary


def training_fingerprint(config: PipelineConfig, dataset_version: str) -> str:
    """Hash of everything that shapes the weights, except how many steps run and checkpointing."""
    train = config.train.model_dump(mode="json")
    del train["steps"], train["checkpoint_every"]
    payload = {
        "model": config.model.model_dump(mode="json"),
        "dataset": {
            "name": config.dataset.name,
            "version": dataset_version,
            "resolution": config.dataset.resolution,
        },
        "train": train,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of ``step`` (1-based): each epoch is a seeded shuffle; batches span epochs."""
    start = (step - 1) * batch_size
    out: list[int] = []
    for pos in range(start, start + batch_size):
        out.append(_epoch_order(n, seed, pos // n)[pos % n])
    return out


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    import torch

    gen = torch.Generator().manual_seed(_derive_seed(seed, "epoch", epoch))
    return tuple(torch.randperm(n, generator=gen).tolist())


def _derive_seed(seed: int, *what: object) -> int:
    text = ":".join(str(x) for x in (seed, *what))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _train_step(
    parts: SDComponents,
    data: Any,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    step: int,
    config: PipelineConfig,
    device: torch.device,
) -> float:
    import torch
    import torch.nn.functional as F

    from sd_pipeline.train.encoded import scaled_latents

    tc = config.train
    idx = torch.tensor(batch_indices(step, tc.batch_size, len(data), tc.seed))
    gen = torch.Generator().manual_seed(_derive_seed(tc.seed, "step", step))
    scheduler = parts.noise_scheduler
    latents = scaled_latents(data.latent_mean[idx], data.latent_std[idx], parts.vae.config, gen)
    noise = torch.randn(latents.shape, generator=gen)
    num_timesteps = scheduler.config["num_train_timesteps"]
    timesteps = torch.randint(0, num_timesteps, (len(idx),), generator=gen)
    cond = data.caption_embeddings[data.caption_index[idx]]
    if tc.caption_dropout > 0:
        drop = torch.rand(len(idx), generator=gen) < tc.caption_dropout
        cond[drop] = data.empty_embedding

    latents, noise, timesteps, cond = (t.to(device) for t in (latents, noise, timesteps, cond))
    t_ids = cast("torch.IntTensor", timesteps)
    noisy = scheduler.add_noise(latents, noise, t_ids)
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t_ids)
    else:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not trainable here; "
            "set model.prediction_type to epsilon or v_prediction"
        )
    pred = parts.unet(noisy, timesteps, encoder_hidden_states=cond, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _make_trainable(parts: SDComponents, config: PipelineConfig) -> list[torch.nn.Parameter]:
    tc = config.train
    if tc.method == "lora":
        from peft import LoraConfig

        parts.unet.add_adapter(
            LoraConfig(
                r=tc.lora_rank,
                lora_alpha=tc.lora_alpha or tc.lora_rank,  # type: ignore[arg-type]  # float works
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
    else:
        parts.unet.requires_grad_(True)
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {tc.method!r} left nothing to train in the UNet")
    return params


def _resume(
    store: Store,
    run_id: str,
    steps: int,
    fingerprint: str,
    named: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> tuple[int, list[float]]:
    """Load the newest committed checkpoint (if any) into the weights and optimizer.

    Returns the step to continue after and the recent losses.
    """
    import torch

    done = [s for s in committed_steps(store, run_id) if s <= steps]
    if not done:
        return 0, []
    ckpt = load_checkpoint(store, run_id, done[-1])
    if ckpt.state.get("fingerprint") != fingerprint or set(ckpt.trainable) != set(named):
        raise ValueError(
            f"run {run_id!r} has checkpoints from a different model, dataset or train config; "
            f"use a new run id, or delete {store.uri(f'runs/{run_id}/checkpoints')} to start over"
        )
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(ckpt.trainable[name])
    optimizer.load_state_dict(ckpt.optimizer)
    log.info("resuming run %s from step %d", run_id, ckpt.step)
    return ckpt.step, list(ckpt.state["recent_losses"])


def _publish(
    store: Store, prefix: str, parts: SDComponents, config: PipelineConfig, metadata: dict[str, Any]
) -> None:
    store.delete_prefix(prefix)  # leftovers of a crashed attempt
    with tempfile.TemporaryDirectory(prefix="sd-final-") as tmp:
        folder = Path(tmp)
        if config.train.method == "lora":
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                StableDiffusionPipeline,
            )
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(parts.unet))
            adapter = {
                k: sorted(v) if isinstance(v, set) else v
                for k, v in parts.unet.peft_config["default"].to_dict().items()
            }
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in layers.items()},
                safe_serialization=True,
                unet_lora_adapter_metadata=adapter,
            )
            metadata["weights"] = LORA_WEIGHTS
        else:
            parts.unet.save_pretrained(folder / "unet", safe_serialization=True)
            metadata["weights"] = "unet"
        (folder / "metadata.json").write_text(
            json.dumps(metadata, indent=2, sort_keys=True, default=str)
        )
        store.upload_dir(folder, prefix)


def _already_trained(store: Store, run_id: str, fingerprint: str, steps: int) -> dict[str, Any]:
    meta = store.get_json(f"{final_prefix(run_id)}/metadata.json")
    if meta.get("fingerprint") != fingerprint or meta.get("steps") != steps:
        raise ValueError(
            f"run {run_id!r} is already trained with a different model, dataset or train config "
            f"(see {store.uri(final_prefix(run_id))}/metadata.json); use a new run id"
        )
    log.info("run %s is already trained (%s); nothing to do",
             run_id, store.uri(final_prefix(run_id)))
    keys = ("run_id", "final_uri", "method", "steps", "seconds", "samples_per_s", "final_loss")
    return {k: meta[k] for k in keys}


def _check_run_id(run_id: str) -> None:
    if not run_id or "/" in run_id or run_id.startswith(".") or run_id != run_id.strip():
        raise ValueError(f"run id {run_id!r} must be a non-empty name without '/' or leading '.'")


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training on CPU (free there), restoring the caller's setting."""
    import torch

    if device.type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), (
        torch.is_deterministic_algorithms_warn_only_enabled()
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    from sd_pipeline import __version__

    return {
        "sd_pipeline": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
