"""A dataset split encoded once by the frozen VAE and text encoder, kept in memory.

Training and evaluation only ever need latents and caption embeddings, so images are
decoded, encoded and dropped chunk by chunk; equal captions share one embedding.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sd_pipeline.ingest.shards import ShardSample

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer


class EmptySplitError(ValueError):
    """The split to encode holds no samples."""


@dataclass
class EncodedSplit:
    """Latent distribution per image plus one embedding per distinct caption."""

    keys: list[str]
    latent_mean: torch.Tensor  # [N, C, h, w], unscaled VAE latents
    latent_std: torch.Tensor  # [N, C, h, w]
    caption_index: torch.Tensor  # [N] -> row of caption_embeddings
    caption_embeddings: torch.Tensor  # [distinct captions, tokens, dim]
    empty_embedding: torch.Tensor  # [tokens, dim], the unconditional caption ""

    def __len__(self) -> int:
        return len(self.keys)


def decode_image(jpeg: bytes, resolution: int, key: str = "?") -> np.ndarray:
    """JPEG bytes -> float32 CHW array in [-1, 1], center-cropped and resized to a square."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB")
    except Exception as err:
        raise ValueError(f"sample {key!r}: image does not decode ({err})") from None
    if rgb.size != (resolution, resolution):
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize(
            (resolution, resolution), Image.Resampling.BICUBIC
        )
    pixels = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1).copy()


def encode_split(
    samples: Iterable[ShardSample],
    *,
    resolution: int,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    batch_size: int = 16,
) -> EncodedSplit:
    """Decode and encode ``samples`` with the frozen encoders (on their device, no grad)."""
    import numpy as np
    import torch

    keys: list[str] = []
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    caption_rows: dict[str, int] = {}
    caption_index: list[int] = []
    chunk: list[np.ndarray] = []
    device, dtype = vae.device, vae.dtype

    def flush() -> None:
        with torch.no_grad():
            pixels = torch.from_numpy(np.stack(chunk)).to(device=device, dtype=dtype)
            dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        chunk.clear()

    for sample in samples:
        keys.append(sample.key)
        chunk.append(decode_image(sample.image, resolution, sample.key))
        caption_index.append(caption_rows.setdefault(sample.caption, len(caption_rows)))
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    if not keys:
        raise EmptySplitError("no samples to encode")

    captions = list(caption_rows)  # insertion order = row order
    return EncodedSplit(
        keys=keys,
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        caption_index=torch.tensor(caption_index, dtype=torch.long),
        caption_embeddings=embed_captions(captions, tokenizer, text_encoder),
        empty_embedding=embed_captions([""], tokenizer, text_encoder)[0],
    )


def embed_captions(
    captions: list[str],
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    batch_size: int = 64,
) -> torch.Tensor:
    """Last hidden states of the text encoder, padded to the tokenizer's max length (as SD does)."""
    import torch

    out = []
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(
            captions[i : i + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out.append(text_encoder(ids.to(text_encoder.device))[0].float().cpu())
    return torch.cat(out)


def scaled_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    vae_config: object,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw latents from the cached distribution (mean only without a generator), SD-scaled."""
    import torch

    latents = mean if generator is None else mean + std * torch.randn(
        mean.shape, generator=generator, dtype=mean.dtype
    )
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.scaling_factor  # type: ignore[attr-defined]
