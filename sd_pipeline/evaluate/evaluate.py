"""The evaluate stage: how a run denoises held-out images next to its base, and what it draws.

Both numbers use the same latents, noise (from ``evaluate.loss_seed``) and timesteps, so
their difference is the fine-tuning alone. The picture grid has one row per prompt and
one column per seed, sampled with DDIM. Results go to ``runs/<run_id>/eval/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.versions import iter_samples, resolve_version
from sd_pipeline.storage import Store
from sd_pipeline.train.trainer import final_prefix

if TYPE_CHECKING:
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from PIL import Image

    from sd_pipeline.models.base import SDComponents
    from sd_pipeline.train.encoded import EncodedSplit

log = logging.getLogger("sd_pipeline.evaluate")


def eval_prefix(run_id: str) -> str:
    return f"runs/{run_id}/eval"


def evaluate(config: PipelineConfig, run_id: str, dataset_version: str) -> dict[str, Any]:
    """Evaluate trained run ``run_id`` on the holdout split of ``dataset_version``; idempotent.

    Returns ``{"metrics": {name: float}, "grid_uri": ..., "metrics_uri": ...}``.
    """
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    version = resolve_version(store, config.dataset.name, dataset_version)
    prefix = eval_prefix(run_id)
    fingerprint = _eval_fingerprint(config, version)
    if store.is_committed(prefix):
        return _already_evaluated(store, run_id, fingerprint)
    if not store.is_committed(final_prefix(run_id)):
        raise FileNotFoundError(
            f"run {run_id!r} has no committed weights at {store.uri(final_prefix(run_id))}; "
            "run the train stage first"
        )
    run = store.get_json(f"{final_prefix(run_id)}/metadata.json")

    import torch

    from sd_pipeline.models.base import (
        default_cache_dir,
        load_components,
        model_digest,
        resolve_base_model,
    )
    from sd_pipeline.train.encoded import EmptySplitError, encode_split

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_path = resolve_base_model(
        run["base_model"]["uri"],
        default_cache_dir(),
        endpoint_url=config.storage.endpoint_url,
    )
    if model_digest(base_path) != run["base_model"]["sha256"]:
        raise ValueError(
            f"base model {run['base_model']['uri']} has changed since run {run_id!r} was "
            "trained on it (sha256 differs); evaluate against the original base or retrain"
        )
    parts = load_components(base_path, dtype=torch.float32)
    parts.noise_scheduler.register_to_config(prediction_type=run["prediction_type"])
    parts.freeze(device)
    _check_timesteps(config.evaluate.loss_timesteps, parts.noise_scheduler)

    try:
        holdout: EncodedSplit | None = encode_split(
            iter_samples(store, config.dataset.name, version, split="holdout"),
            resolution=config.dataset.resolution,
            tokenizer=parts.tokenizer,
            text_encoder=parts.text_encoder,
            vae=parts.vae,
        )
    except EmptySplitError:
        log.warning(
            "dataset %s/%s has no holdout samples, so no holdout loss is reported; "
            "set dataset.holdout_fraction above 0 to get one", config.dataset.name, version
        )
        holdout = None

    ev = config.evaluate
    if holdout is not None:  # before the run's weights go into parts.unet
        base = holdout_losses(parts.unet, holdout, parts.noise_scheduler, parts.vae.config,
                              ev.loss_timesteps, ev.loss_seed)
    pipe = _tuned_pipeline(store, run_id, run["method"], parts, device)

    metrics: dict[str, float] = {}
    if holdout is not None:
        tuned = holdout_losses(pipe.unet, holdout, parts.noise_scheduler, parts.vae.config,
                               ev.loss_timesteps, ev.loss_seed)
        metrics["holdout_loss"] = _mean(tuned)
        metrics["base_holdout_loss"] = _mean(base)
        metrics["holdout_loss_improvement"] = metrics["base_holdout_loss"] - metrics["holdout_loss"]
        for t in ev.loss_timesteps:
            metrics[f"holdout_loss_t{t}"] = tuned[t]
            metrics[f"base_holdout_loss_t{t}"] = base[t]
        metrics["holdout_samples"] = float(len(holdout))

    t_grid = time.perf_counter()
    grid = sample_grid(pipe, ev.prompts, ev.seeds, config.dataset.resolution,
                       ev.num_inference_steps, ev.guidance_scale)
    grid_seconds = time.perf_counter() - t_grid
    buf = io.BytesIO()
    grid.save(buf, format="PNG")

    grid_key, metrics_key = f"{prefix}/grid.png", f"{prefix}/metrics.json"
    report = {
        "run_id": run_id,
        "metrics": metrics,
        "dataset": {"name": config.dataset.name, "version": version},
        "loss": {"timesteps": ev.loss_timesteps, "seed": ev.loss_seed,
                 "prediction_type": run["prediction_type"]},
        "grid": {
            "uri": store.uri(grid_key),
            "layout": "one row per prompt, one column per seed",
            "prompts": ev.prompts,
            "seeds": ev.seeds,
            "resolution": config.dataset.resolution,
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": ev.num_inference_steps,
            "guidance_scale": ev.guidance_scale,
            "seconds": round(grid_seconds, 3),
        },
        "fingerprint": fingerprint,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.delete_prefix(prefix)  # leftovers of a crashed attempt
    store.put_bytes(grid_key, buf.getvalue())
    store.put_json(metrics_key, report)
    result = {"metrics": metrics, "grid_uri": store.uri(grid_key),
              "metrics_uri": store.uri(metrics_key)}
    store.commit(prefix, result)
    if holdout is not None:
        log.info(
            "evaluated run %s on %s/%s: holdout loss %.4f (base %.4f) over %d images; "
            "grid of %d prompts x %d seeds in %.1f s",
            run_id, config.dataset.name, version, metrics["holdout_loss"],
            metrics["base_holdout_loss"], len(holdout), len(ev.prompts), len(ev.seeds),
            grid_seconds,
        )
    else:
        log.info("evaluated run %s: grid of %d prompts x %d seeds in %.1f s (no holdout loss)",
                 run_id, len(ev.prompts), len(ev.seeds), grid_seconds)
    return result


def holdout_losses(
    unet: torch.nn.Module,
    data: EncodedSplit,
    scheduler: DDPMScheduler,
    vae_config: Any,
    timesteps: list[int],
    seed: int,
    batch_size: int = 16,
) -> dict[int, float]:
    """Mean denoising MSE per timestep, with latent means and noise drawn from ``seed``.

    The noise for timestep ``t`` depends only on ``seed`` and ``t``, so two models (or two
    calls) see exactly the same inputs.
    """
    import torch
    import torch.nn.functional as F

    from sd_pipeline.train.encoded import scaled_latents

    prediction_type = scheduler.config["prediction_type"]
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type {prediction_type!r} has no holdout loss here; "
            "use epsilon or v_prediction (model.prediction_type)"
        )
    device = next(unet.parameters()).device
    latents = scaled_latents(data.latent_mean, data.latent_std, vae_config, None)
    cond = data.caption_embeddings[data.caption_index]
    out: dict[int, float] = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        noise = torch.randn(latents.shape, generator=gen)
        total = 0.0
        for i in range(0, len(data), batch_size):
            x0, eps, c = (v[i : i + batch_size].to(device) for v in (latents, noise, cond))
            tt = cast("torch.IntTensor", torch.full((len(x0),), t, dtype=torch.long, device=device))
            target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, tt)
            with torch.no_grad():
                pred = unet(scheduler.add_noise(x0, eps, tt), tt, encoder_hidden_states=c).sample
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
        out[t] = total / latents.numel()
    return out


def sample_grid(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> Image.Image:
    """One image per (prompt, seed), each from its own CPU generator: rows prompts, columns seeds."""
    import torch
    from PIL import Image

    grid = Image.new("RGB", (len(seeds) * resolution, len(prompts) * resolution))
    for row, prompt in enumerate(prompts):
        for col, seed in enumerate(seeds):
            image = pipe(
                prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            grid.paste(image.convert("RGB"), (col * resolution, row * resolution))
    return grid


def _tuned_pipeline(
    store: Store, run_id: str, method: str, parts: SDComponents, device: torch.device
) -> StableDiffusionPipeline:
    """The base parts with the run's weights (LoRA loaded into ``parts.unet`` in place), DDIM."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    with tempfile.TemporaryDirectory(prefix="sd-eval-") as tmp:
        weights = store.download_dir(final_prefix(run_id), Path(tmp))
        unet = parts.unet
        if method == "full":
            unet = UNet2DConditionModel.from_pretrained(
                weights / "unet", use_safetensors=True, local_files_only=True
            )
            unet.requires_grad_(False)
            unet.eval()
            unet.to(device)  # type: ignore[arg-type]  # mypy misreads the wrapped .to
        pipe = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
        if method == "lora":
            pipe.load_lora_weights(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_timesteps(timesteps: list[int], scheduler: DDPMScheduler) -> None:
    limit = scheduler.config["num_train_timesteps"]
    bad = [t for t in timesteps if not 0 <= t < limit]
    if bad:
        raise ValueError(
            f"evaluate.loss_timesteps {bad} are outside the model's 0..{limit - 1}; "
            "pick timesteps in that range"
        )


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def _eval_fingerprint(config: PipelineConfig, version: str) -> str:
    payload = {
        "evaluate": config.evaluate.model_dump(mode="json"),
        "dataset": {"name": config.dataset.name, "version": version,
                    "resolution": config.dataset.resolution},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _already_evaluated(store: Store, run_id: str, fingerprint: str) -> dict[str, Any]:
    prefix = eval_prefix(run_id)
    report = store.get_json(f"{prefix}/metrics.json")
    if report.get("fingerprint") != fingerprint:
        raise ValueError(
            f"run {run_id!r} was already evaluated with other evaluate settings or dataset "
            f"version (see {store.uri(prefix)}/metrics.json); delete {store.uri(prefix)} "
            "to evaluate again"
        )
    log.info("run %s is already evaluated (%s); nothing to do", run_id, store.uri(prefix))
    return {"metrics": report["metrics"], "grid_uri": store.uri(f"{prefix}/grid.png"),
            "metrics_uri": store.uri(f"{prefix}/metrics.json")}
