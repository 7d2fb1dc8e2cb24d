"""Pretraining the toy base model from scratch on the toy world (``sd-pipeline pretrain-base``).

A Stable Diffusion 1.x-architecture pipeline (AutoencoderKL, UNet2DConditionModel, CLIP
text model and tokenizer, DDPM schedule) small enough to train on a CPU in well under an
hour, strong enough to draw what a caption asks for. Two phases, as SD itself was made:
the VAE alone (reconstruction + a small KL term), then the UNet and the text encoder
together on the VAE's latents (epsilon prediction, Min-SNR-5 weighting, 10% empty
captions so classifier-free guidance works, EMA weights published). ``world.NEW_SHAPE``
is left out on purpose: the demo's fine-tune teaches it.

The same settings and seed rebuild the same model up to floating-point reordering
between machines; the shipped weights record both (``sd_pipeline_model.json``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline import world

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sd_pipeline.pretrain")

MARKER = "sd_pipeline_model.json"
MODEL_MAX_LENGTH = 16  # tokens per caption: the world's captions need 10


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the toy base model; recorded beside its weights."""

    seed: int = 0
    images: int = 20_000
    resolution: int = 64
    vae_steps: int = 1_500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3_000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    warmup_steps: int = 200
    threads: int = 0  # 0 = torch's default


def scene_images(scenes: list[world.Scene], resolution: int, seed: int) -> torch.Tensor:
    """The scenes rendered as one uint8 tensor [N, 3, H, W]."""
    import numpy as np
    import torch

    rng = random.Random(seed)
    arrays = np.stack([np.asarray(world.render(s, resolution, rng)) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images.float().div(127.5).sub(1.0)


def build_vae(resolution: int) -> Any:
    """4x down to 16x16x4 latents at 64 px: 8x down loses the small shapes (measured)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
    )


def build_unet(resolution: int, cross_attention_dim: int) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=32,
    )


def _lr_lambda(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_vae(images: torch.Tensor, settings: PretrainSettings, out: Path | None = None) -> Any:
    """The VAE alone: MSE reconstruction plus ``vae_kl_weight`` x KL, AdamW, warm-up + cosine."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    vae = build_vae(settings.resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(settings.warmup_steps, settings.vae_steps))
    started = time.perf_counter()
    for step in range(settings.vae_steps):
        idx = torch.randint(0, len(images), (settings.vae_batch,), generator=gen)
        x = to_unit(images[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x) + settings.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(torch.nn.functional.mse_loss(rec, x).item(), 1e-10))
            log.info(
                "vae step %d/%d loss %.5f psnr %.1f dB (%.0f s)",
                step,
                settings.vae_steps,
                loss.item(),
                psnr,
                time.perf_counter() - started,
            )
    vae.eval()
    return vae


def encode_latents(vae: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means, unscaled, [N, 4, H/4, W/4]."""
    import torch

    rows = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            rows.append(vae.encode(to_unit(images[i : i + batch])).latent_dist.mean)
    return torch.cat(rows)


def psnr(vae: Any, images: torch.Tensor) -> float:
    """Mean reconstruction PSNR (dB, on [-1, 1]) of ``images`` through the VAE."""
    import torch

    with torch.no_grad():
        x = to_unit(images)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = torch.nn.functional.mse_loss(rec, x, reduction="none").mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())


def tokenizer_for_world(folder: Path) -> Any:
    """A CLIP tokenizer whose vocabulary is learned from every caption of the world."""
    from transformers import CLIPTokenizer

    from sd_pipeline.models.tiny import write_clip_vocab

    vocab_dir = folder / "_vocab"
    write_clip_vocab(vocab_dir, world.captions())
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=MODEL_MAX_LENGTH)
    shutil.rmtree(vocab_dir)
    return tokenizer


def text_config(tokenizer: Any, hidden: int, layers: int) -> Any:
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token],
    )


def token_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023)."""
    import torch

    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / snr


def train_denoiser(
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    tokenizer: Any,
    settings: PretrainSettings,
    checkpoint: Any = None,
) -> tuple[Any, Any]:
    """UNet and text encoder trained jointly; returns their EMA copies.

    ``checkpoint(unet, text_encoder, step)`` is called every 500 steps with the EMA
    weights, so a long run leaves a usable model behind at any point.
    """
    import copy

    import torch
    from transformers import CLIPTextModel

    from sd_pipeline.models.tiny import sd_scheduler

    gen = torch.Generator().manual_seed(settings.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, hidden=64, layers=2))
        unet = build_unet(settings.resolution, cross_attention_dim=64)
    scheduler = sd_scheduler()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(settings.warmup_steps, settings.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    started, running = time.perf_counter(), None
    for step in range(settings.unet_steps):
        idx = torch.randint(0, len(latents), (settings.unet_batch,), generator=gen)
        z0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < settings.caption_dropout
        tokens[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(z0, noise, t)
        hidden = text_encoder(tokens)[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(scheduler, t, settings.snr_gamma)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == settings.unet_steps - 1:
            rate = (step + 1) * settings.unet_batch / (time.perf_counter() - started)
            log.info(
                "denoiser step %d/%d loss %.4f (avg %.4f) lr %.2e, %.0f samples/s",
                step,
                settings.unet_steps,
                loss.item(),
                running,
                sched.get_last_lr()[0],
                rate,
            )
        if checkpoint is not None and step and step % 500 == 0:
            checkpoint(ema_unet, ema_text, step)
    return ema_unet, ema_text


def save_pipeline(
    folder: Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any, info: dict[str, Any]
) -> None:
    """A diffusers-format SD 1.x folder, weights in fp16 safetensors, marker written last."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    from sd_pipeline.models.tiny import sd_scheduler

    pipe = StableDiffusionPipeline(
        vae=copy_half(vae),
        text_encoder=copy_half(text_encoder),
        tokenizer=tokenizer,
        unet=copy_half(unet),
        scheduler=sd_scheduler(),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(base_model_card(info))
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del torch


def copy_half(module: Any) -> Any:
    import copy

    import torch

    return copy.deepcopy(module).to(torch.float16)


def base_model_card(info: dict[str, Any]) -> str:
    s = info["settings"]
    return f"""# toy-sd: a toy Stable Diffusion 1.x base model for sd-pipeline's own demo and tests

**What it is.** A Stable Diffusion 1.x-architecture pipeline (AutoencoderKL 4x down,
UNet2DConditionModel, CLIP text model and tokenizer, DDPM scaled-linear schedule) trained
from scratch on sd-pipeline's toy world: flat coloured shapes ({", ".join(world.KNOWN_SHAPES)}),
two sizes, eight colours, on plain backgrounds of another colour, at {s["resolution"]} px.
Captions read `a large red circle on a blue background`.

**What it is not.** A general image model. It knows nothing outside that world and was
never shown a `{world.NEW_SHAPE}`: the demo's fine-tune teaches it, so a fine-tune visibly
changes what it can draw. Use it to exercise the pipeline, never as a real base model.

**How it was made.** `sd-pipeline pretrain-base --seed {s["seed"]}` ({info["machine"]},
{info["minutes"]:.1f} minutes): {s["images"]} rendered images; the VAE for {s["vae_steps"]} steps at
batch {s["vae_batch"]}, then UNet and text encoder together for {s["unet_steps"]} steps at batch
{s["unet_batch"]} (epsilon, Min-SNR-{s["snr_gamma"]:g}, {s["caption_dropout"]:.0%} empty captions, EMA
{s["ema_decay"]}). Weights are the EMA copies in fp16 safetensors.

**Measured.** VAE reconstruction PSNR on held-out renders: {info["vae_psnr_db"]:.1f} dB.
Parameters: UNet {info["params"]["unet"]:,}, VAE {info["params"]["vae"]:,}, text encoder
{info["params"]["text_encoder"]:,}.

Licence: the same as sd-pipeline's code; the training data is generated by `sd_pipeline.world`.
"""


def pretrain_base(out_dir: Path, settings: PretrainSettings | None = None) -> dict[str, Any]:
    """Train the toy base model into ``out_dir`` (replaced atomically); returns its record."""
    import platform

    import torch

    settings = settings or PretrainSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = random.Random(settings.seed)
    scenes = world.sample_scenes(settings.images, rng, world.KNOWN_SHAPES)
    images = scene_images(scenes, settings.resolution, settings.seed)
    held_out = scene_images(
        world.sample_scenes(256, random.Random(settings.seed + 99)), settings.resolution, settings.seed + 99
    )
    log.info(
        "rendered %d training images at %d px in %.0f s",
        len(images),
        settings.resolution,
        time.perf_counter() - started,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = train_vae(images, settings)
    vae.requires_grad_(False)
    quality = psnr(vae, held_out)
    log.info("VAE held-out PSNR %.1f dB", quality)
    raw = encode_latents(vae, images)
    scale = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out_dir.with_name(out_dir.name + ".vae"), safe_serialization=True)
    latents = raw * scale
    del images
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=out_dir.parent))
    tokenizer = tokenizer_for_world(work)
    ids = token_ids(tokenizer, [s.caption for s in scenes])
    empty = token_ids(tokenizer, [""])[0]

    def record(step: int, unet: Any, text_encoder: Any) -> dict[str, Any]:
        return {
            "kind": "toy-stable-diffusion",
            "description": "A toy SD 1.x-architecture base model pretrained on sd-pipeline's toy world "
            f"(without the {world.NEW_SHAPE}), for the pipeline's own demo and tests.",
            "settings": asdict(settings),
            "steps_done": step,
            "new_concept": world.NEW_SHAPE,
            "vae_scaling_factor": scale,
            "vae_psnr_db": round(quality, 2),
            "minutes": (time.perf_counter() - started) / 60,
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "params": {
                name: sum(p.numel() for p in m.parameters())
                for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
            },
        }

    def checkpoint(unet: Any, text_encoder: Any, step: int) -> None:
        save_pipeline(
            out_dir.with_name(out_dir.name + ".partial"),
            vae,
            unet,
            text_encoder,
            tokenizer,
            record(step, unet, text_encoder),
        )
        log.info("checkpoint at step %d in %s.partial", step, out_dir)

    try:
        unet, text_encoder = train_denoiser(latents, ids, empty, tokenizer, settings, checkpoint)
        info = record(settings.unet_steps, unet, text_encoder)
        save_pipeline(out_dir, vae, unet, text_encoder, tokenizer, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("toy base model in %s after %.1f minutes", out_dir, info["minutes"])
    return info
