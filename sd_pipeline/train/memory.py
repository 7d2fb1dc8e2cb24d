"""Will this training config fit on this GPU? A coarse estimate, made before any weights load.

A run that dies with CUDA out-of-memory twenty minutes in, after the pod waited for a GPU
node, wastes the most expensive minutes of the pipeline. The estimate reads parameter
shapes from the safetensors headers (no weights loaded) and adds optimizer state and an
activation term calibrated on SD 1.5 at 512 px (about 2.5 GB per sample in bf16 with SDPA,
as the diffusers example scripts report); gradient checkpointing divides activations by
about 3. It is deliberately coarse: the run is refused only when the estimate exceeds the
GPU's whole memory, and the message says what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
ACTIVATION_CONSTANT = 43.0  # bytes per (latent pixel x channel width x element byte), from SD 1.5
CHECKPOINTING_FACTOR = 3.0


@dataclass
class MemoryEstimate:
    weights: float
    trainable: float
    optimizer: float
    activations_per_sample: float
    batch_size: int

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.optimizer + self.activations_per_sample * self.batch_size

    def largest_batch(self, capacity: float) -> int:
        fixed = self.weights + self.trainable + self.optimizer
        return max(0, int((capacity - fixed) // max(self.activations_per_sample, 1.0)))


def unet_parameters(base_path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the base UNet, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted((base_path / "unet").glob("*.safetensors")):
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise FileNotFoundError(f"{base_path / 'unet'} holds no safetensors weights")
    return shapes


def estimate(base_path: Path, tc: Any, resolution: int, precision: str) -> MemoryEstimate:
    """Bytes a training step needs on the GPU for train config ``tc`` at ``resolution``."""
    import math

    shapes = unet_parameters(base_path)
    unet_config = json.loads((base_path / "unet" / "config.json").read_text())
    params = sum(math.prod(s) for s in shapes.values())
    if tc.method == "full":
        trainable = params
    else:  # LoRA on the attention projections: r x (in + out) per targeted matrix
        targets = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
        trainable = sum(tc.lora_rank * (s[0] + s[1]) for k, s in shapes.items() if k.endswith(targets))
    element = 2 if precision in ("fp16", "bf16") else 4
    optimizer_bytes = 2 if tc.optimizer == "adamw8bit" else 8
    width = sum(unet_config.get("block_out_channels", [320])) * unet_config.get("layers_per_block", 2)
    latent = (resolution // 8) ** 2
    activations = ACTIVATION_CONSTANT * latent * width * element
    if tc.gradient_checkpointing:
        activations /= CHECKPOINTING_FACTOR
    return MemoryEstimate(
        # Full: fp32 master weights (autocast makes the half-precision copies); LoRA on a GPU keeps
        # the frozen base in the autocast dtype.
        weights=params * (element if tc.method == "lora" else 4),
        trainable=trainable * 4,  # gradients
        optimizer=trainable * optimizer_bytes,
        activations_per_sample=activations,
        batch_size=tc.batch_size,
    )


def check_fits(est: MemoryEstimate, capacity: float, what: str) -> None:
    """Refuse a config whose estimate exceeds ``capacity`` bytes, saying what would fit."""
    if est.total <= capacity:
        return
    fits = est.largest_batch(capacity)
    advice = [
        f"lower train.batch_size to {fits} (with gradient_accumulation_steps for the same effective batch)"
        if fits
        else "no batch size fits"
    ]
    advice += [
        "set train.gradient_checkpointing: true (about 3x less activation memory)",
        "use train.method: lora",
        "ask for a larger GPU in compute.train.gpu_types",
    ]
    raise MemoryError(
        f"{what} needs about {est.total / GIB:.1f} GiB (weights {est.weights / GIB:.1f}, gradients and "
        f"optimizer {(est.trainable + est.optimizer) / GIB:.1f}, activations "
        f"{est.activations_per_sample * est.batch_size / GIB:.1f} for batch {est.batch_size}) but the GPU "
        f"has {capacity / GIB:.1f} GiB; " + "; or ".join(advice)
    )
