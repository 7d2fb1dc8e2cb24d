"""Training throughput: our trainer against the machine's limit and a diffusers-example loop.

Two models. ``--model tiny`` (default, CPU): Stable Diffusion's proportions shrunk (an 8x VAE:
128 px images -> 16x16 latents, CLIP text encoder, UNet with cross-attention) on a small
synthetic dataset version. ``--model sd15`` (GPU): Stable Diffusion 1.5's architecture with
random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M, 77 tokens), 512 px
images -> 64x64 latents, bf16 autocast. For full fine-tuning and LoRA it measures
steady-state samples/s of:

- ``limit``: the bare UNet forward + backward + AdamW step on precomputed latents and
  embeddings in a loop, nothing else (torch's default AdamW): what this machine does for
  that model with no tricks.
- ``limit+``: the same loop with what our trainer adds to the step: fused AdamW and, with
  ``--compile``, torch.compile. The fair ceiling for ``ours (compiled)``.
- ``ours``: ``sd_pipeline.train.trainer.train`` on a warm latent cache (data loading,
  bucketing, logging, checkpointing every 20 steps included), eager and, with ``--compile``,
  with ``train.compile: true``.
- ``diffusers-ex``: what ``train_text_to_image.py`` / ``train_text_to_image_lora.py`` do every
  step (decode JPEGs, transform, VAE-encode, text-encode, then the UNet step, their AdamW,
  their dtype handling under bf16). The example scripts are not on this machine (no hub
  access, not in the diffusers wheel), so this re-implements their per-step work with the same
  diffusers/transformers calls; it is labelled as such in the output.

Times exclude the first ``--warmup`` steps of each loop (torch.compile compiles there; its
time is printed); each figure is the best of ``--repeats`` interleaved runs (a shared machine
only slows a loop down). On a GPU, peak memory (``torch.cuda.max_memory_allocated``) is
printed per variant. Asserts nothing; prints ratios; ``--json FILE`` also writes them.

    .venv/bin/python benchmarks/train.py [--steps 40] [--batch 8] [--images 64] [--compile]
    python benchmarks/train.py --model sd15 --batch 16 --steps 25 --repeats 1 --compile   # GPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SD_PIPELINE_NO_PROGRESS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

class Setup:
    """What a variant needs: the model kind, device, precision and sizes."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.model_kind = args.model
        self.resolution = args.resolution or (512 if args.model == "sd15" else 128)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = "bf16" if self.device.type == "cuda" else "no"
        self.dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.steps, self.warmup, self.batch = args.steps, args.warmup, args.batch

    def autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None


def make_dataset(store: Any, n: int, resolution: int) -> list[Any]:
    from PIL import Image, ImageDraw

    from sd_pipeline.ingest.shards import ShardSample, write_shard
    from sd_pipeline.ingest.versions import latest_key, version_prefix

    colors = {"red": (220, 30, 30), "blue": (30, 60, 220), "yellow": (240, 220, 40), "green": (30, 170, 60)}
    u = resolution / 128
    samples = []
    for i in range(n):
        fg, bg = list(colors)[i % 4], list(colors)[(i // 4 + 1) % 4]
        shape = ("circle", "square", "triangle")[i % 3]
        img = Image.new("RGB", (resolution, resolution), colors[bg])
        draw = ImageDraw.Draw(img)
        x, y = 16 + i % 16, 16 + (i * 7) % 16
        box = (int(x * u), int(y * u), int((x + 80) * u), int((y + 80) * u))
        if shape == "circle":
            draw.ellipse(box, fill=colors[fg])
        elif shape == "square":
            draw.rectangle(box, fill=colors[fg])
        else:
            apex = ((box[0] + box[2]) // 2, box[1])
            draw.polygon([(box[0], box[3]), (box[2], box[3]), apex], fill=colors[fg])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        samples.append(ShardSample(f"{i:06d}", buf.getvalue(), f"a {fg} {shape} on a {bg} background",
                                   {"split": "train"}))
    prefix = version_prefix("bench", "v1")
    store.put_bytes(f"{prefix}/shards/shard-000000.tar", write_shard(samples))
    store.commit(prefix, {"samples": n})
    store.write_pointer(latest_key("bench"), "v1")
    return samples


def build_sd15_shaped(folder: Path, captions: list[str]) -> Path:
    """Stable Diffusion 1.5's architecture with random weights, saved as a diffusers folder.

    UNet, VAE and text encoder have SD 1.5's configs (diffusers' UNet defaults are SD 1.x's
    but for the cross-attention width); only the tokenizer's vocabulary is learned from the
    captions (no hub here), which changes the embedding table, not the compute.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_pipeline.models.tiny import BOS, EOS, sd_scheduler, write_clip_vocab

    if (folder / "model_index.json").is_file():
        return folder
    with tempfile.TemporaryDirectory() as vocab_dir:
        vocab = write_clip_vocab(Path(vocab_dir), captions)
        tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def config_for(root: Path, model: Path, method: str, setup: Setup, compiled: bool) -> Any:
    from sd_pipeline.config import parse_config

    gpu = setup.device.type == "cuda"
    return parse_config({}, {
        "storage.root": f"file://{root / 'store'}",
        "model.base": str(model),
        "dataset.name": "bench",
        "dataset.resolution": setup.resolution,
        "train.method": method,
        "train.steps": setup.steps,
        "train.batch_size": setup.batch,
        "train.learning_rate": 1e-4,
        # A full SD-1.5 checkpoint (weights + AdamW state) is ~10 GB: on the GPU run it is left
        # out of the steady-state window; on CPU every 20 steps is inside it.
        "train.checkpoint_every": 0 if gpu else 20,
        "train.log_every": 10,
        "train.mixed_precision": setup.precision,
        "train.compile": compiled,
        "registry.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }, env={"SD_PIPELINE_HOME": str(root / "home")})


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VARIANTS = ["limit", "limit+", "ours", "limit+compiled", "ours+compiled", "diffusers-ex"]


def fresh_unet(model: Path, method: str, setup: Setup, base_dtype: Any = None) -> Any:
    """The UNet as a training loop sets it up; ``base_dtype`` casts the frozen base (LoRA)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(method == "full")
    if method == "lora":
        if base_dtype is not None:
            unet.to(dtype=base_dtype)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
        for p in unet.parameters():  # diffusers' cast_training_params: adapters train in fp32
            if p.requires_grad:
                p.data = p.data.float()
    unet.to(setup.device)
    unet.train()
    return unet


def timed(step: Any, setup: Setup) -> tuple[float, float]:
    """(seconds of the timed steps, seconds of the warm-up steps)."""
    t0 = time.perf_counter()
    for i in range(setup.warmup):
        step(i)
    setup.sync()
    t1 = time.perf_counter()
    for i in range(setup.warmup, setup.steps):
        step(i)
    setup.sync()
    return time.perf_counter() - t1, t1 - t0


def bare_limit(model: Path, method: str, setup: Setup, fast: bool, compiled: bool) -> dict[str, Any]:
    """UNet fwd + bwd + AdamW on tensors already on the device: samples/s.

    ``fast``: fused AdamW (and ``compiled``: torch.compile), as our trainer steps.
    """
    import torch
    import torch.nn.functional as F

    setup.reset_memory()
    unet = fresh_unet(model, method, setup, base_dtype=setup.dtype)
    if compiled:
        unet.compile()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if fast else torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    side = setup.resolution // 8
    dev = setup.device
    latents = torch.randn(setup.batch, 4, side, side, generator=gen).to(dev)
    cond = torch.randn(setup.batch, 77, unet.config.cross_attention_dim, generator=gen).to(dev)
    timesteps = torch.randint(0, 1000, (setup.batch,), generator=gen).to(dev)
    noise = torch.randn(latents.shape, generator=gen).to(dev)

    def step(_: int) -> None:
        with setup.autocast():
            pred = unet(latents, timesteps, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds, warm = timed(step, setup)
    return {"rate": (setup.steps - setup.warmup) * setup.batch / seconds, "warmup_s": warm,
            "memory_gib": setup.peak_memory_gib()}


def diffusers_example_loop(model: Path, samples: list[Any], method: str, setup: Setup) -> dict[str, Any]:
    """The per-step work of diffusers' train_text_to_image(_lora).py, re-implemented: samples/s."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    setup.reset_memory()
    dev, weight_dtype = setup.device, setup.dtype or torch.float32
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    # As the scripts do under mixed precision: frozen VAE and text encoder in the half dtype,
    # the UNet in fp32 for full fine-tuning, in the half dtype with fp32 adapters for LoRA.
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False)
    text_encoder.to(dev, dtype=weight_dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False)
    vae.to(dev, dtype=weight_dtype)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    unet = fresh_unet(model, method, setup, base_dtype=setup.dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", opt, num_warmup_steps=0, num_training_steps=setup.steps)
    res = setup.resolution

    def transform(jpeg: bytes) -> Any:  # Resize, CenterCrop, ToTensor, Normalize([0.5], [0.5])
        img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((res, res), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1)

    def step(i: int) -> None:
        chunk = [samples[(i * setup.batch + k) % len(samples)] for k in range(setup.batch)]
        pixels = torch.stack([transform(s.image) for s in chunk]).to(dev)
        ids = tokenizer([s.caption for s in chunk], max_length=tokenizer.model_max_length,
                        padding="max_length", truncation=True, return_tensors="pt").input_ids.to(dev)
        with setup.autocast():
            latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (setup.batch,), device=dev)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_scheduler.step()
        opt.zero_grad()
        float(loss.detach())  # the scripts read the loss every step (train_loss += avg_loss.item())

    seconds, _ = timed(step, setup)
    rate = (setup.steps - setup.warmup) * setup.batch / seconds
    return {"rate": rate, "memory_gib": setup.peak_memory_gib()}


def ours(root: Path, model: Path, method: str, setup: Setup, run_id: str, compiled: bool) -> dict[str, Any]:
    from sd_pipeline.train.trainer import train

    setup.reset_memory()
    config = config_for(root, model, method, setup, compiled)
    t0 = time.perf_counter()
    result = train(config, run_id)
    wall = time.perf_counter() - t0
    meta = json.loads((root / "store" / "runs" / run_id / "final" / "metadata.json").read_text())
    # Steady state, as the loops are timed: the first steps (warm-up, compiling) left out.
    rate = meta.get("steady_samples_per_s") or result["samples_per_s"]
    return {"rate": rate, "wall": wall, "cache": meta["cache"], "samples": setup.steps * setup.batch,
            "memory_gib": setup.peak_memory_gib()}


def _fmt(x: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default 128 (tiny), 512 (sd15)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="measure only these (default: all; the compiled ones with --compile)")
    parser.add_argument("--merge", type=Path, default=None,
                        help="a --json file of an earlier run of the same setup: fills in the variants "
                        "not measured now (e.g. eager first, compiled later)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and data here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = Setup(args)

    from sd_pipeline.models.tiny import build_tiny_sd
    from sd_pipeline.storage import LocalStore

    side = setup.resolution // 8
    where = torch.cuda.get_device_name() if setup.device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads; model {args.model}; "
          f"{args.images} images at {setup.resolution} px -> {side}x{side} latents, batch {args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up steps not timed), precision {setup.precision}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="sd-bench-train-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        store = LocalStore(root / "store")
        samples = make_dataset(store, args.images, setup.resolution)
        captions = sorted({s.caption for s in samples})
        t0 = time.perf_counter()
        if args.model == "sd15":
            model = build_sd15_shaped(root / "sd15-shaped", captions)
        else:
            model = build_tiny_sd(root / "tiny-sd", captions)
        print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
        variants = args.variants or [v for v in VARIANTS if args.compile or "compiled" not in v]
        earlier = {}
        if args.merge:
            earlier = {row["method"]: row for row in json.loads(args.merge.read_text())["table"]}
        table: list[dict[str, Any]] = []
        cold_rate: float | None = None

        def run_variant(name: str, method: str, r: int) -> dict[str, Any]:
            if name.startswith("limit"):
                return bare_limit(model, method, setup, fast=name != "limit", compiled="compiled" in name)
            if name.startswith("ours"):
                compiled = "compiled" in name
                run_id = f"warm-{method}-{'c' if compiled else ''}{r}"
                return ours(root, model, method, setup, run_id, compiled=compiled)
            return diffusers_example_loop(model, samples, method, setup)

        for n, method in enumerate(args.methods):
            if n == 0 and "ours" in variants:  # builds the cache (unless --workdir kept it) for the rest
                cold = ours(root, model, method, setup, f"cold-{method}", compiled=False)
                cold_rate = None if cold["cache"]["hit"] else cold["samples"] / cold["wall"]
            best: dict[str, dict[str, Any]] = {}
            # Interleaved repeats, best of each: a shared machine only ever slows a loop down.
            for r in range(args.repeats):
                for name in variants:
                    figure = run_variant(name, method, r)
                    if name.startswith("ours"):
                        assert figure["cache"]["hit"]
                    if name in best and "warmup_s" in figure:  # report the compile (first) warm-up
                        figure["warmup_s"] = max(figure["warmup_s"], best[name]["warmup_s"])
                    if name not in best or figure["rate"] > best[name]["rate"]:
                        best[name] = figure
                    elif "warmup_s" in figure:
                        best[name]["warmup_s"] = figure["warmup_s"]
                rates = ", ".join(f"{k} {v['rate']:.1f}" for k, v in best.items())
                print(f"  {method} repeat {r + 1} (best so far): {rates}", flush=True)
            table.append(earlier.get(method, {}) | {"method": method} | best)
            if args.json:  # after each method: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"setup": vars(args) | {"resolution": setup.resolution,
                                                                        "device": where},
                                                 "table": table}, indent=2, default=str))

        print()
        ex = "diffusers-ex"
        head = f"{'method':<6} {'variant':<16} {'samples/s':>10} {'/limit':>7} {'/limit+':>8} {'/'+ex:>14}"
        if setup.device.type == "cuda":
            head += f" {'peak GiB':>9}"
        print(head)

        def ratio(rate: float, row: dict[str, Any], name: str | None) -> float | None:
            return rate / row[name]["rate"] if name in row else None

        for row in table:
            for name in [v for v in VARIANTS if v in row]:
                fig, rate = row[name], row[name]["rate"]
                same = "limit+compiled" if "compiled" in name else "limit+"
                line = (f"{row['method']:<6} {name:<16} {rate:>10.1f} "
                        f"{_fmt(ratio(rate, row, 'limit'), 7, 2)} {_fmt(ratio(rate, row, same), 8, 2)} "
                        f"{_fmt(ratio(rate, row, ex), 14, 2)}")
                if setup.device.type == "cuda":
                    line += f" {_fmt(fig.get('memory_gib'), 9)}"
                print(line)
            if "limit+compiled" in row:
                print(f"{'':<6} torch.compile warm-up of the bare loop ({args.warmup} steps): "
                      f"{row['limit+compiled']['warmup_s']:.0f} s")
        first = table[0]
        cache = next((first[v]["cache"] for v in ("ours", "ours+compiled") if v in first), None)
        print()
        if cache:
            print(f"cache build (once per dataset versions x base model x resolution x buckets): "
                  f"{cache.get('build_seconds')} s for {args.images} images; cache load on a warm run: "
                  f"{cache['seconds']} s")
        if cold_rate is not None:
            print(f"ours with a cold cache, whole call incl. model load and cache build ({first['method']}): "
                  f"{cold_rate:.1f} samples/s over {args.steps * args.batch} samples")
        print("samples/s, best of the repeats. limit = bare UNet fwd+bwd+AdamW on in-memory tensors; "
              "limit+ = the same with fused AdamW (+compiled: torch.compile); diffusers-ex = the per-step "
              "work of diffusers' train_text_to_image(_lora).py, re-implemented (the scripts are not "
              "available offline)")


if __name__ == "__main__":
    main()
