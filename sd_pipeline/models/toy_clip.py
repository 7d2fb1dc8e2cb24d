"""The toy world's evaluator: a tiny CLIP (transformers ``CLIPModel``) trained on that world.

It is used exactly as a real CLIP is (``evaluate.clip_model``: clip_score, fd_clip,
kid_clip), so those metrics run in the demo and the tests instead of being skipped. It
also ships ``attributes.json`` (the caption template and every attribute's values), from
which the evaluation reads each attribute of a sampled picture back by zero-shot
classification: "is this a cross?" becomes the share of pictures whose best caption,
among those differing only in the shape, names the shape the prompt asked for.

A classifier trained only on clean renders scores VAE reconstructions badly (measured:
0.38 shape accuracy), so half of its training pictures go through the toy base model's
VAE, and some are blurred or noised: what it judges is what a diffusion model draws.
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
from sd_pipeline.models.pretrain import (
    scene_images,
    text_config,
    to_unit,
    token_ids,
    tokenizer_for_world,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sd_pipeline.pretrain")

ATTRIBUTES_FILE = "attributes.json"
MARKER = "sd_pipeline_evaluator.json"


@dataclass(frozen=True)
class ClipSettings:
    seed: int = 0
    images: int = 20_000
    resolution: int = 64
    steps: int = 1_200
    batch: int = 128
    lr: float = 1e-3
    reconstructed_share: float = 0.5
    threads: int = 0


def build_clip(tokenizer: Any, resolution: int) -> Any:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=resolution,
        patch_size=8,
        projection_dim=64,
    )
    text = text_config(tokenizer, hidden=64, layers=2)
    return CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)
    )


def image_processor(resolution: int) -> Any:
    """What ``ClipEvaluator`` feeds the model: [-1, 1] pixels at ``resolution``, as trained."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": resolution},
        do_center_crop=True,
        crop_size={"height": resolution, "width": resolution},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def reconstruct(vae: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``images`` (uint8) through the VAE and back, as uint8."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_unit(images[i : i + batch])
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur or noise on a quarter of the batch each: what an undertrained model draws."""
    import torch

    n = len(x)
    pick = torch.rand(n, generator=gen)
    blur = pick < 0.25
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = torch.nn.functional.conv2d(x[blur], kernel, padding=1, groups=3)
    noise = (pick >= 0.25) & (pick < 0.5)
    if noise.any():
        x[noise] = x[noise] + 0.1 * torch.randn(x[noise].shape, generator=gen)
    return x


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4 returned the tensor."""
    return out if not hasattr(out, "pooler_output") else out.pooler_output


def attribute_accuracy(
    model: Any, tokenizer: Any, images: torch.Tensor, scenes: list[world.Scene]
) -> dict[str, float]:
    """Zero-shot accuracy per attribute: the caption that differs only in that attribute wins."""
    import torch

    vocab = world.vocabulary()
    cache: dict[str, torch.Tensor] = {}

    def text_features(texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in cache]
        if missing:
            feats = torch.nn.functional.normalize(
                _features(model.get_text_features(input_ids=token_ids(tokenizer, missing))), dim=-1
            )
            cache.update(zip(missing, feats, strict=True))
        return torch.stack([cache[t] for t in texts])

    with torch.no_grad():
        img = torch.nn.functional.normalize(
            _features(model.get_image_features(pixel_values=to_unit(images))), dim=-1
        )
        out: dict[str, float] = {}
        for attribute in world.ATTRIBUTES:
            correct = 0
            for i, scene in enumerate(scenes):
                options = [
                    v
                    for v in vocab[attribute]
                    if scene.replace(attribute, v).color != scene.replace(attribute, v).background
                ]
                texts = [scene.replace(attribute, v).caption for v in options]
                txt = text_features(texts)
                correct += int(options[int((txt @ img[i]).argmax())] == scene.value(attribute))
            out[attribute] = correct / len(scenes)
    return out


def pretrain_clip(out_dir: Path, vae_dir: Path, settings: ClipSettings | None = None) -> dict[str, Any]:
    """Train the evaluator into ``out_dir`` (replaced atomically); returns its record."""
    import platform

    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from transformers import CLIPProcessor

    settings = settings or ClipSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(
        vae_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
    ).eval()
    scenes = world.sample_scenes(settings.images, random.Random(settings.seed + 7), world.SHAPES)
    clean = scene_images(scenes, settings.resolution, settings.seed + 7)
    recon = reconstruct(vae, clean)
    test_scenes = world.sample_scenes(400, random.Random(settings.seed + 1001), world.SHAPES)
    test_clean = scene_images(test_scenes, settings.resolution, settings.seed + 1001)
    test_recon = reconstruct(vae, test_clean)
    log.info(
        "evaluator data: %d pictures (+ VAE reconstructions) in %.0f s",
        len(clean),
        time.perf_counter() - started,
    )

    work = Path(tempfile.mkdtemp(prefix=".evaluator-", dir=out_dir.parent))
    try:
        tokenizer = tokenizer_for_world(work)
        captions = sorted({s.caption for s in scenes})
        label_of = {c: i for i, c in enumerate(captions)}
        labels = torch.tensor([label_of[s.caption] for s in scenes])
        ids = token_ids(tokenizer, [s.caption for s in scenes])
        gen = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = build_clip(tokenizer, settings.resolution)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
        warm = 100

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, settings.steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        model.train()
        for step in range(settings.steps):
            idx = torch.randint(0, len(clean), (settings.batch,), generator=gen)
            use_recon = torch.rand(settings.batch, generator=gen) < settings.reconstructed_share
            pixels = torch.where(use_recon[:, None, None, None], recon[idx], clean[idx])
            x = _augment(to_unit(pixels), gen)
            loss = _clip_loss(model, x, ids[idx], labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == settings.steps - 1:
                log.info(
                    "evaluator step %d/%d loss %.4f (%.0f s)",
                    step,
                    settings.steps,
                    loss.item(),
                    time.perf_counter() - started,
                )
        model.eval()
        accuracy = {
            "clean": attribute_accuracy(model, tokenizer, test_clean, test_scenes),
            "vae_reconstructed": attribute_accuracy(model, tokenizer, test_recon, test_scenes),
        }
        log.info("evaluator held-out attribute accuracy: %s", accuracy)
        info = {
            "kind": "toy-world-clip",
            "description": "A tiny CLIP trained on sd-pipeline's toy world, the demo's and tests' evaluator.",
            "settings": asdict(settings),
            "held_out_accuracy": accuracy,
            "held_out_images": len(test_scenes),
            "params": sum(p.numel() for p in model.parameters()),
            "minutes": (time.perf_counter() - started) / 60,
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            CLIPProcessor(
                image_processor=image_processor(settings.resolution), tokenizer=tokenizer
            ).save_pretrained(tmp)
            (tmp / ATTRIBUTES_FILE).write_text(json.dumps(attribute_probes(), indent=2) + "\n")
            (tmp / "README.md").write_text(evaluator_card(info))
            (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def _clip_loss(model: Any, pixels: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch

    img = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = torch.nn.functional.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
        + torch.sum(-target * logits.log_softmax(dim=0), dim=0).mean()
    )


def attribute_probes() -> dict[str, Any]:
    """What ``attributes.json`` holds: how to read each attribute back from a picture."""
    return {
        "template": "a {size} {color} {shape} on a {background} background",
        "attributes": world.vocabulary(),
        "distinct": [["color", "background"]],
        "how": "zero-shot: among captions that differ from the prompt only in one attribute, the "
        "one closest to the picture names that attribute's value",
    }


def evaluator_card(info: dict[str, Any]) -> str:
    acc = info["held_out_accuracy"]
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{acc[name][a]:.3f}" for a in world.ATTRIBUTES) + " |"
        for name in ("clean", "vae_reconstructed")
    )
    s = info["settings"]
    return f"""# toy-clip: the toy world's evaluator, for sd-pipeline's own demo and tests

**What it is.** A tiny CLIP (transformers `CLIPModel`: a 3-layer ViT on 8-pixel patches
and a 2-layer text transformer, {info["params"]:,} parameters) trained contrastively on
sd-pipeline's toy world (all shapes: {", ".join(world.SHAPES)}), half of the pictures through
the toy base model's VAE, some blurred or noised. It is a measuring instrument for that
world only; its numbers mean nothing on any other pictures.

**How it was made.** `sd-pipeline pretrain-evaluator --seed {s["seed"]} --steps {s["steps"]}`
({info["machine"]}, {info["minutes"]:.1f} minutes), batch {s["batch"]}.

**Held-out accuracy** (zero-shot per attribute, {info["held_out_images"]} pictures never seen in
training):

| pictures | {" | ".join(world.ATTRIBUTES)} |
|---|{"---|" * len(world.ATTRIBUTES)}
{rows}
"""
