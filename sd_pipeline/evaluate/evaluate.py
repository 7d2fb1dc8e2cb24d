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
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from sd_pipeline.config import PipelineConfig
from sd_pipeline.evaluate.prompts import PromptSet, load_prompt_set
from sd_pipeline.ingest.versions import iter_samples_many
from sd_pipeline.storage import Store
from sd_pipeline.train.trainer import dataset_versions, final_prefix

if TYPE_CHECKING:
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from PIL import Image

    from sd_pipeline.evaluate.evaluators import ClipEvaluator, SafetyEvaluator
    from sd_pipeline.ingest.shards import ShardSample
    from sd_pipeline.models.base import SDComponents
    from sd_pipeline.train.cache import BucketData

    SamplingPipeline: TypeAlias = StableDiffusionPipeline | StableDiffusionXLPipeline  # SD 1.x/2.x or SDXL

log = logging.getLogger("sd_pipeline.evaluate")

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, as the trainer saves it

LOSS_SOURCE = {
    "evaluator": None,
    "how": "denoising MSE of the model's UNet on the holdout latents of its base VAE and text "
           "encoder (from the latent cache), fixed noise (evaluate.loss_seed) at evaluate.loss_timesteps",
}


def eval_prefix(run_id: str) -> str:
    return f"runs/{run_id}/eval"


@dataclass
class _Shared:
    """What both models of one evaluation reuse: encoded holdout and base losses per base model."""

    holdout: list[ShardSample]
    versions: list[str] = field(default_factory=list)
    encoded: dict[str, list[BucketData] | None] = field(default_factory=dict)
    captions: dict[str, Any] = field(default_factory=dict)
    base_losses: dict[str, dict[int, float]] = field(default_factory=dict)
    real_features: Any = None


@dataclass
class _ModelResult:
    metrics: dict[str, float]
    grid: Image.Image
    sources: dict[str, Any]
    skipped: dict[str, str]


def evaluate(config: PipelineConfig, run_id: str, *, out_prefix: str | None = None) -> dict[str, Any]:
    """Evaluate trained run ``run_id`` on the holdout split of its dataset versions; idempotent.

    Results go to ``runs/<run_id>/eval/``, or to ``out_prefix`` (a re-evaluation of a
    registered version on another prompt set keeps the original evaluation untouched).

    The registry's champion (if any, and unless ``evaluate.compare_with_champion`` is off)
    is evaluated alongside with the same inputs. Returns ``{"metrics", "grid_uri",
    "metrics_uri", "comparison_grid_uri", "champion_version"}``.
    """
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    versions = dataset_versions(store, config)
    version = ",".join(versions)
    ev = config.evaluate
    prompt_set = load_prompt_set(ev.prompt_set, ev.prompts, endpoint_url=config.storage.endpoint_url)
    prefix = out_prefix or eval_prefix(run_id)
    fingerprint = _eval_fingerprint(config, version, prompt_set)
    if store.is_committed(prefix):
        return _already_evaluated(store, run_id, fingerprint, prefix)
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
    shared = _Shared(
        holdout=list(iter_samples_many(store, config.dataset.name, versions, split="holdout")),
        versions=versions,
    )
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
    result = _result(store, run_id, report, prefix)
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
    from sd_pipeline.models.conditioning import encode_prompts
    from sd_pipeline.train.cache import EmptySplitError, ensure_cache

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
        cache, _ = ensure_cache(config, store, shared.versions, base_path, parts=parts, splits=("holdout",))
        try:
            shared.encoded[sha] = cache.split("holdout")
        except EmptySplitError:
            shared.encoded[sha] = None
        shared.captions[sha] = cache.captions
    holdout = shared.encoded[sha]
    captions = shared.captions[sha]

    def text(trained: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption embeddings: cached, unless the run trained the text encoder (then encode now)."""
        if captions.hidden.numel() and not (trained and run.get("config", {}).get("train", {}).get(
                "train_text_encoder")):
            return captions.hidden, captions.pooled
        cond = encode_prompts(parts, captions.texts)
        return cond.hidden, cond.pooled

    metrics: dict[str, float] = {}
    sources: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if holdout is not None and sha not in shared.base_losses:  # before the run's weights go in
        shared.base_losses[sha] = holdout_losses(parts.unet, holdout, text(False), parts.noise_scheduler,
                                                 parts.vae.config, ev.loss_timesteps, ev.loss_seed)
    pipe = _tuned_pipeline(store, run_id, run["method"], parts, device)

    if holdout is not None:
        base = shared.base_losses[sha]
        tuned = holdout_losses(pipe.unet, holdout, text(True), parts.noise_scheduler, parts.vae.config,
                               ev.loss_timesteps, ev.loss_seed)
        metrics["holdout_loss"] = _mean(tuned)
        metrics["base_holdout_loss"] = _mean(base)
        metrics["holdout_loss_improvement"] = metrics["base_holdout_loss"] - metrics["holdout_loss"]
        for t in ev.loss_timesteps:
            metrics[f"holdout_loss_t{t}"] = tuned[t]
            metrics[f"base_holdout_loss_t{t}"] = base[t]
        metrics["holdout_samples"] = float(sum(len(b) for b in holdout))
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
    pipe: SamplingPipeline,
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
    pipe: SamplingPipeline, prompt: str, seed: int, resolution: int, steps: int, guidance: float
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


def _result(store: Store, run_id: str, report: dict[str, Any], prefix: str | None = None) -> dict[str, Any]:
    prefix = prefix or eval_prefix(run_id)
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
    data: list[BucketData],
    text: tuple[torch.Tensor, torch.Tensor | None],
    scheduler: DDPMScheduler,
    vae_config: Any,
    timesteps: list[int],
    seed: int,
    batch_size: int = 16,
) -> dict[int, float]:
    """Mean denoising MSE per timestep, with latent means and noise drawn from ``seed``.

    The noise for timestep ``t`` depends only on ``seed``, ``t`` and the bucket, so two models
    (or two calls) see exactly the same inputs. ``text`` is (hidden, pooled) per caption row.
    """
    import torch
    import torch.nn.functional as F

    from sd_pipeline.models.conditioning import sdxl_conditions
    from sd_pipeline.train.trainer import _draw_latents

    prediction_type = scheduler.config["prediction_type"]
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type {prediction_type!r} has no holdout loss here; "
            "use epsilon or v_prediction (model.prediction_type)"
        )
    device = next(unet.parameters()).device
    hidden, pooled = text
    out: dict[int, float] = {}
    for t in timesteps:
        total, count = 0.0, 0
        for b, bucket in enumerate(data):
            latents = _draw_latents(bucket.mean[:], bucket.std[:], vae_config, None)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + t + 7919 * b)
            noise = torch.randn(latents.shape, generator=gen)
            for i in range(0, len(bucket), batch_size):
                rows = bucket.caption_index[i : i + batch_size]
                x0, eps = latents[i : i + batch_size].to(device), noise[i : i + batch_size].to(device)
                added = None
                if pooled is not None:
                    added = {k: v.to(device) for k, v in sdxl_conditions(
                        pooled[rows], bucket.original_size[i : i + batch_size],
                        bucket.crop_top_left[i : i + batch_size], (bucket.bucket.height, bucket.bucket.width),
                    ).items()}
                tt = cast("torch.IntTensor", torch.full((len(x0),), t, dtype=torch.long, device=device))
                target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, tt)
                with torch.no_grad():
                    noisy = scheduler.add_noise(x0, eps, tt)
                    pred = unet(noisy, tt, encoder_hidden_states=hidden[rows].to(device),
                                added_cond_kwargs=added).sample
                total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += latents.numel()
        out[t] = total / count
    return out


def _tuned_pipeline(
    store: Store, run_id: str, method: str, parts: SDComponents, device: torch.device
) -> SamplingPipeline:
    """The base parts with the run's weights (LoRA loaded into ``parts.unet`` in place), DDIM.

    An SDXL base gives a ``StableDiffusionXLPipeline`` (both text encoders, pooled-text and
    size conditioning), any other a ``StableDiffusionPipeline``; the run's weights go in the
    same way for both: a full fine-tune's ``unet/`` replaces the UNet, a LoRA's
    ``pytorch_lora_weights.safetensors`` loads through ``load_lora_weights`` (text-encoder
    LoRA layers included). A full run that trained the text encoder also has
    ``text_encoder/``: it replaces ``parts.text_encoder`` in place, like a LoRA, so
    ``encode_prompts(parts, ...)`` sees the tuned encoder too.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory(prefix="sd-eval-") as tmp:
        weights = store.download_dir(final_prefix(run_id), Path(tmp))
        unet = parts.unet
        if method == "full":
            unet = _frozen(UNet2DConditionModel.from_pretrained(
                weights / "unet", use_safetensors=True, local_files_only=True
            ), device)
            if (weights / "text_encoder").is_dir():
                parts.text_encoder = _frozen(CLIPTextModel.from_pretrained(
                    weights / "text_encoder", use_safetensors=True, local_files_only=True
                ), device)
        pipe = _sampling_pipeline(parts, unet, DDIMScheduler.from_config(parts.noise_scheduler.config))
        if method == "lora":
            if not (weights / LORA_WEIGHTS_FILE).is_file():
                raise FileNotFoundError(
                    f"run {run_id!r} is a LoRA run but {store.uri(final_prefix(run_id))} holds no "
                    f"{LORA_WEIGHTS_FILE}; retrain it"
                )
            pipe.load_lora_weights(weights, weight_name=LORA_WEIGHTS_FILE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frozen(module: Any, device: torch.device) -> Any:
    module.requires_grad_(False)
    module.eval()
    return module.to(device)


def _sampling_pipeline(
    parts: SDComponents, unet: UNet2DConditionModel, scheduler: Any
) -> SamplingPipeline:
    """A diffusers pipeline over already loaded parts: SDXL's when the base is SDXL."""
    if parts.is_sdxl:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
            StableDiffusionXLPipeline,
        )

        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,  # type: ignore[arg-type]  # is_sdxl: not None
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,  # type: ignore[arg-type]
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,  # an invisible watermark would change the measured pictures
        )
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


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


def _already_evaluated(
    store: Store, run_id: str, fingerprint: str, prefix: str | None = None
) -> dict[str, Any]:
    prefix = prefix or eval_prefix(run_id)
    report = store.get_json(f"{prefix}/metrics.json")
    if report.get("fingerprint") != fingerprint:
        raise ValueError(
            f"run {run_id!r} was already evaluated with other evaluate settings or dataset "
            f"version (see {store.uri(prefix)}/metrics.json); delete {store.uri(prefix)} "
            "to evaluate again"
        )
    log.info("run %s is already evaluated (%s); nothing to do", run_id, store.uri(prefix))
    return _result(store, run_id, report, prefix)
