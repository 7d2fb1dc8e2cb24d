"""The evaluate stage: a run measured the same way as the champion it may replace.

Both models see the same holdout latents, noise (``evaluate.loss_seed``) and timesteps for
the denoising loss, and the same prompt set, seeds, DDIM steps and guidance for pictures.
Evaluator metrics (CLIP score, CLIP-feature distances, unsafe rate) run when their weights
are configured; otherwise the results say why not. Results go to ``runs/<run_id>/eval/``:
``metrics.json``, ``grid.png`` (rows prompts, columns seeds) and, when there is a champion,
``compare.png`` (this run left, the champion right).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sd_pipeline.config import PipelineConfig
from sd_pipeline.evaluate.prompts import PromptSet, load_prompt_set
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

    from sd_pipeline.evaluate.evaluators import ClipEvaluator, SafetyEvaluator
    from sd_pipeline.ingest.shards import ShardSample
    from sd_pipeline.models.base import SDComponents
    from sd_pipeline.train.encoded import EncodedSplit

log = logging.getLogger("sd_pipeline.evaluate")

LOSS_SOURCE = {
    "evaluator": None,
    "how": "denoising MSE of the model's UNet on the holdout latents of its base VAE and text "
           "encoder, fixed noise (evaluate.loss_seed) at evaluate.loss_timesteps",
}


def eval_prefix(run_id: str) -> str:
    return f"runs/{run_id}/eval"


@dataclass
class _Shared:
    """What both models of one evaluation reuse: encoded holdout and base losses per base model."""

    holdout: list[ShardSample]
    encoded: dict[str, EncodedSplit | None] = field(default_factory=dict)
    base_losses: dict[str, dict[int, float]] = field(default_factory=dict)
    real_features: Any = None


@dataclass
class _ModelResult:
    metrics: dict[str, float]
    grid: Image.Image
    sources: dict[str, Any]
    skipped: dict[str, str]


def evaluate(config: PipelineConfig, run_id: str, dataset_version: str) -> dict[str, Any]:
    """Evaluate trained run ``run_id`` on the holdout split of ``dataset_version``; idempotent.

    The registry's champion (if any, and unless ``evaluate.compare_with_champion`` is off)
    is evaluated alongside with the same inputs. Returns ``{"metrics", "grid_uri",
    "metrics_uri", "comparison_grid_uri", "champion_version"}``.
    """
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    version = resolve_version(store, config.dataset.name, dataset_version)
    ev = config.evaluate
    prompt_set = load_prompt_set(ev.prompt_set, ev.prompts, endpoint_url=config.storage.endpoint_url)
    prefix = eval_prefix(run_id)
    fingerprint = _eval_fingerprint(config, version, prompt_set)
    if store.is_committed(prefix):
        return _already_evaluated(store, run_id, fingerprint)
    if not store.is_committed(final_prefix(run_id)):
        raise FileNotFoundError(
            f"run {run_id!r} has no committed weights at {store.uri(final_prefix(run_id))}; "
            "run the train stage first"
        )
    run = store.get_json(f"{final_prefix(run_id)}/metadata.json")

    import torch

    from sd_pipeline.evaluate.evaluators import load_evaluators
    from sd_pipeline.evaluate.grids import side_by_side
    from sd_pipeline.models.base import default_cache_dir

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip, safety, evaluators = load_evaluators(
        ev.clip_model, ev.safety_checker, device, default_cache_dir().parent / "evaluators",
        config.storage.endpoint_url,
    )
    shared = _Shared(holdout=list(iter_samples(store, config.dataset.name, version, split="holdout")))
    if not shared.holdout:
        log.warning(
            "dataset %s/%s has no holdout samples, so no holdout loss is reported; "
            "set dataset.holdout_fraction above 0 to get one", config.dataset.name, version
        )
    mine = _evaluate_model(store, run_id, run, config, prompt_set, shared, clip, safety, device)
    champion, champion_result = _evaluate_champion(store, run_id, config, prompt_set, shared, clip,
                                                   safety, device)

    grid_key, metrics_key, compare_key = (f"{prefix}/grid.png", f"{prefix}/metrics.json",
                                          f"{prefix}/compare.png")
    files = {grid_key: _png(mine.grid)}
    if champion is not None and champion_result is not None:
        files[compare_key] = _png(side_by_side(mine.grid, champion_result.grid, "challenger",
                                               f"champion v{champion['model_version']}"))
        champion.update(metrics=champion_result.metrics, skipped_metrics=champion_result.skipped)
    res = config.dataset.resolution
    report = {
        "run_id": run_id,
        "metrics": mine.metrics,
        "metric_sources": mine.sources,
        "skipped": mine.skipped,
        "evaluators": evaluators,
        "prompt_set": prompt_set.describe(),
        "champion": champion,
        "dataset": {"name": config.dataset.name, "version": version},
        "loss": {"timesteps": ev.loss_timesteps, "seed": ev.loss_seed,
                 "prediction_type": run["prediction_type"]},
        "grid": {
            "uri": store.uri(grid_key),
            "layout": "one row per prompt, one column per seed",
            "size": [len(ev.seeds) * res, len(prompt_set.prompts) * res],
            "prompts": prompt_set.prompts,
            "seeds": ev.seeds,
            "resolution": res,
            "scheduler": "DDIMScheduler",
            "num_inference_steps": ev.num_inference_steps,
            "guidance_scale": ev.guidance_scale,
        },
        "comparison_grid": (
            {"uri": store.uri(compare_key),
             "layout": "this run's grid on the left, the champion's on the right, same prompts and seeds"}
            if compare_key in files else None
        ),
        "fingerprint": fingerprint,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.delete_prefix(prefix)  # leftovers of a crashed attempt
    for key, data in files.items():
        store.put_bytes(key, data)
    store.put_json(metrics_key, report)
    result = _result(store, run_id, report)
    store.commit(prefix, result)
    loss = (f"holdout loss {mine.metrics['holdout_loss']:.4f} (base {mine.metrics['base_holdout_loss']:.4f})"
            if "holdout_loss" in mine.metrics else "no holdout loss")
    versus = (f"; champion v{champion['model_version']} holdout loss "
              f"{champion_result.metrics.get('holdout_loss', float('nan')):.4f}"
              if champion is not None and champion_result is not None else "")
    log.info("evaluated run %s on %s/%s with prompt set %s v%s: %s%s; %d metrics, %d skipped, %.1f s",
             run_id, config.dataset.name, version, prompt_set.name, prompt_set.version, loss, versus,
             len(mine.metrics), len(mine.skipped), report["seconds"])
    return result


def _evaluate_champion(
    store: Store,
    run_id: str,
    config: PipelineConfig,
    prompt_set: PromptSet,
    shared: _Shared,
    clip: ClipEvaluator | None,
    safety: SafetyEvaluator | None,
    device: torch.device,
) -> tuple[dict[str, Any] | None, _ModelResult | None]:
    """The registry's champion, evaluated like the run (or why it was not)."""
    if not config.evaluate.compare_with_champion:
        return {"skipped": "evaluate.compare_with_champion is off"}, None
    from sd_pipeline.registry.promotion import current_champion

    try:
        ref = current_champion(config.registry)
    except ImportError as err:
        raise ImportError(
            f"evaluate finds the champion in the MLflow registry but {err.name or 'mlflow'} is not "
            "installed here; install the tracking extra (sd-pipeline[tracking]) in this image, or set "
            "evaluate.compare_with_champion: false"
        ) from err
    if ref is None:
        return None, None
    info: dict[str, Any] = {"model_name": ref.model_name, "model_version": ref.version, "run_id": ref.run_id}
    if ref.run_id == run_id:
        return {**info, "skipped": "this run is the champion"}, None
    if ref.run_id is None or not store.is_committed(final_prefix(ref.run_id)):
        where = store.uri(final_prefix(ref.run_id)) if ref.run_id else "(no sd_pipeline.run_id tag)"
        return {**info, "skipped": f"the champion's weights are not in this store: {where}"}, None
    meta = store.get_json(f"{final_prefix(ref.run_id)}/metadata.json")
    try:
        result = _evaluate_model(store, ref.run_id, meta, config, prompt_set, shared, clip, safety, device)
    except (FileNotFoundError, ValueError) as err:
        log.warning("champion version %s (run %s) could not be evaluated: %s", ref.version, ref.run_id, err)
        return {**info, "skipped": str(err)}, None
    return info, result


def _evaluate_model(
    store: Store,
    run_id: str,
    run: dict[str, Any],
    config: PipelineConfig,
    prompt_set: PromptSet,
    shared: _Shared,
    clip: ClipEvaluator | None,
    safety: SafetyEvaluator | None,
    device: torch.device,
) -> _ModelResult:
    """Every metric of one trained run, and its picture grid."""
    import torch

    from sd_pipeline.evaluate.grids import image_grid
    from sd_pipeline.models.base import (
        default_cache_dir,
        load_components,
        model_digest,
        resolve_base_model,
    )
    from sd_pipeline.train.encoded import EmptySplitError, encode_split

    ev = config.evaluate
    base_path = resolve_base_model(
        run["base_model"]["uri"],
        default_cache_dir(),
        endpoint_url=config.storage.endpoint_url,
    )
    sha = run["base_model"]["sha256"]
    if model_digest(base_path) != sha:
        raise ValueError(
            f"base model {run['base_model']['uri']} has changed since run {run_id!r} was "
            "trained on it (sha256 differs); evaluate against the original base or retrain"
        )
    parts = load_components(base_path, dtype=torch.float32)
    parts.noise_scheduler.register_to_config(prediction_type=run["prediction_type"])
    parts.freeze(device)
    _check_timesteps(ev.loss_timesteps, parts.noise_scheduler)

    if sha not in shared.encoded:
        try:
            shared.encoded[sha] = encode_split(
                shared.holdout, resolution=config.dataset.resolution, tokenizer=parts.tokenizer,
                text_encoder=parts.text_encoder, vae=parts.vae,
            )
        except EmptySplitError:
            shared.encoded[sha] = None
    holdout = shared.encoded[sha]
    metrics: dict[str, float] = {}
    sources: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if holdout is not None and sha not in shared.base_losses:  # before the run's weights go in
        shared.base_losses[sha] = holdout_losses(parts.unet, holdout, parts.noise_scheduler,
                                                 parts.vae.config, ev.loss_timesteps, ev.loss_seed)
    pipe = _tuned_pipeline(store, run_id, run["method"], parts, device)

    if holdout is not None:
        base = shared.base_losses[sha]
        tuned = holdout_losses(pipe.unet, holdout, parts.noise_scheduler, parts.vae.config,
                               ev.loss_timesteps, ev.loss_seed)
        metrics["holdout_loss"] = _mean(tuned)
        metrics["base_holdout_loss"] = _mean(base)
        metrics["holdout_loss_improvement"] = metrics["base_holdout_loss"] - metrics["holdout_loss"]
        for t in ev.loss_timesteps:
            metrics[f"holdout_loss_t{t}"] = tuned[t]
            metrics[f"base_holdout_loss_t{t}"] = base[t]
        metrics["holdout_samples"] = float(len(holdout))
        sources["holdout_loss"] = LOSS_SOURCE
    else:
        skipped["holdout_loss"] = ("the dataset version has no holdout split; set "
                                   "dataset.holdout_fraction above 0")

    res = config.dataset.resolution
    rows = [[_sample(pipe, prompt, seed, res, ev.num_inference_steps, ev.guidance_scale)
             for seed in ev.seeds] for prompt in prompt_set.prompts]
    images = [im for row in rows for im in row]
    prompts = [p for p in prompt_set.prompts for _ in ev.seeds]

    if clip is None:
        reason = "evaluate.clip_model is not set (no CLIP weights to measure with)"
        skipped.update(clip_score=reason, fd_clip=reason, kid_clip=reason)
    else:
        metrics["clip_score"] = clip.clip_score(images, prompts)
        sources["clip_score"] = {**clip.weights.describe(), "images": len(images),
                                 "how": "100 x max(cos(image, prompt), 0), mean over the grid"}
        _distribution_metrics(pipe, shared, clip, config, metrics, sources, skipped)
    if safety is None:
        skipped["unsafe_rate"] = "evaluate.safety_checker is not set (no safety classifier configured)"
    else:
        metrics["unsafe_rate"] = safety.unsafe_rate(images)
        sources["unsafe_rate"] = {**safety.weights.describe(), "images": len(images)}
    skipped["fid"] = skipped["kid"] = "Inception-v3 weights are not usable here; see evaluators.inception"
    return _ModelResult(metrics=metrics, grid=image_grid(rows, res), sources=sources, skipped=skipped)


def _distribution_metrics(
    pipe: StableDiffusionPipeline,
    shared: _Shared,
    clip: ClipEvaluator,
    config: PipelineConfig,
    metrics: dict[str, float],
    sources: dict[str, Any],
    skipped: dict[str, str],
) -> None:
    """fd_clip and kid_clip: held-out images against samples drawn from their captions."""
    from PIL import Image

    from sd_pipeline.evaluate.evaluators import frechet_distance, kernel_distance

    ev, res = config.evaluate, config.dataset.resolution
    real = shared.holdout[: ev.fd_samples]
    if len(real) < 2:
        reason = f"needs at least 2 held-out images; the holdout split has {len(shared.holdout)}"
        skipped.update(fd_clip=reason, kid_clip=reason)
        return
    if shared.real_features is None:
        real_images = []
        for sample in real:
            with Image.open(io.BytesIO(sample.image)) as img:
                real_images.append(img.convert("RGB").resize((res, res)))
        shared.real_features = clip.image_embeddings(real_images).numpy()
    # Sample i uses seed i: the same noise for every model, so differences are the models'.
    fakes = [_sample(pipe, s.caption, i, res, ev.num_inference_steps, ev.guidance_scale)
             for i, s in enumerate(real)]
    fake_features = clip.image_embeddings(fakes).numpy()
    metrics["fd_clip"] = frechet_distance(shared.real_features, fake_features)
    metrics["kid_clip"] = kernel_distance(shared.real_features, fake_features)
    how = ("held-out images vs one sample per held-out caption (seed = its index), on L2-normalised "
           "CLIP image embeddings")
    for name in ("fd_clip", "kid_clip"):
        sources[name] = {**clip.weights.describe(), "images": len(real), "how": how}


def _sample(
    pipe: StableDiffusionPipeline, prompt: str, seed: int, resolution: int, steps: int, guidance: float
) -> Image.Image:
    import torch

    return pipe(  # type: ignore[no-any-return]
        prompt, height=resolution, width=resolution, num_inference_steps=steps,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
    ).images[0].convert("RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _result(store: Store, run_id: str, report: dict[str, Any]) -> dict[str, Any]:
    prefix = eval_prefix(run_id)
    champion = report.get("champion") or {}
    return {
        "metrics": report["metrics"],
        "grid_uri": store.uri(f"{prefix}/grid.png"),
        "metrics_uri": store.uri(f"{prefix}/metrics.json"),
        "comparison_grid_uri": (report.get("comparison_grid") or {}).get("uri"),
        "champion_version": champion.get("model_version") if "metrics" in champion else None,
    }


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


def _eval_fingerprint(config: PipelineConfig, version: str, prompt_set: PromptSet) -> str:
    payload = {
        "evaluate": config.evaluate.model_dump(mode="json"),
        "prompt_set": {"name": prompt_set.name, "version": prompt_set.version, "sha256": prompt_set.sha256},
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
    return _result(store, run_id, report)
