"""Text conditioning: captions to what a UNet cross-attends to, for SD 1.x/2.x and SDXL alike.

SD 1.x/2.x condition on the text encoder's last hidden state. SDXL conditions on the
penultimate hidden states of both of its text encoders, concatenated, and adds the second
encoder's pooled embedding plus six size numbers ("time ids") through ``added_cond_kwargs``.
Both follow diffusers' own pipelines, so a model trained here samples the same way there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sd_pipeline.models.base import SDComponents

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


@dataclass
class TextConditioning:
    """Encoded captions: ``hidden`` [N, T, D] for cross-attention; ``pooled`` [N, P] for SDXL only."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


def encode_prompts(parts: SDComponents, captions: list[str], batch_size: int = 64) -> TextConditioning:
    """Encode ``captions`` as the model's pipeline does (no guidance); float32 tensors on the CPU.

    SD: the text encoder's last hidden state, padded to ``model_max_length``. SDXL: as
    ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden state,
    concatenated on the last dim (first encoder first), and ``text_encoder_2``'s projected
    pooled output (``text_embeds``). Runs under ``no_grad`` on each encoder's own device.
    """
    if not captions:
        raise ValueError("captions is empty; pass at least one caption to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    import torch

    hidden: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(captions), batch_size):
            batch = captions[i : i + batch_size]
            if parts.tokenizer_2 is None or parts.text_encoder_2 is None:
                out = parts.text_encoder(_token_ids(parts.tokenizer, batch, parts.text_encoder))
                hidden.append(out[0].float().cpu())
                continue
            first = parts.text_encoder(
                _token_ids(parts.tokenizer, batch, parts.text_encoder), output_hidden_states=True
            )
            second = parts.text_encoder_2(
                _token_ids(parts.tokenizer_2, batch, parts.text_encoder_2), output_hidden_states=True
            )
            hidden.append(torch.cat([first.hidden_states[-2].float().cpu(),
                                     second.hidden_states[-2].float().cpu()], dim=-1))
            pooled.append(second.text_embeds.float().cpu())
    return TextConditioning(hidden=torch.cat(hidden), pooled=torch.cat(pooled) if pooled else None)


def _token_ids(
    tokenizer: CLIPTokenizer, captions: list[str], encoder: CLIPTextModel | CLIPTextModelWithProjection
) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(encoder.device)


def added_conditions(
    parts: SDComponents,
    pooled: torch.Tensor | None,
    *,
    original_sizes: torch.Tensor,
    crops_top_left: torch.Tensor,
    target_size: tuple[int, int],
) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` for a batch; ``None`` for SD 1.x/2.x (their UNets take none).

    ``pooled`` [N, P] comes from ``encode_prompts``; ``original_sizes`` [N, 2] is each image's
    (height, width) before it was resized, ``crops_top_left`` [N, 2] the (top, left) of the
    crop taken from the resized image, ``target_size`` the (height, width) trained or sampled.
    ``time_ids`` is [N, 6] in that order, in ``pooled``'s dtype and on its device.
    """
    if not parts.is_sdxl:
        return None

    if pooled is None:
        raise ValueError("pooled is None but the model is SDXL; pass encode_prompts(...).pooled")
    n = pooled.shape[0]
    for name, value in (("original_sizes", original_sizes), ("crops_top_left", crops_top_left)):
        if tuple(value.shape) != (n, 2):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; it needs one (height, width) or (top, left) "
                f"row per pooled embedding: shape ({n}, 2)"
            )
    if len(target_size) != 2:
        raise ValueError(f"target_size {target_size!r} must be (height, width)")
    _check_added_width(parts, pooled)
    return sdxl_conditions(pooled, original_sizes, crops_top_left, target_size)


def sdxl_conditions(
    pooled: torch.Tensor,
    original_sizes: torch.Tensor,
    crops_top_left: torch.Tensor,
    target_size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The ``added_cond_kwargs`` themselves, unchecked: for loops that hold no ``SDComponents``
    (training on the latent cache) and have checked the shapes once."""
    import torch

    n = pooled.shape[0]
    target = torch.tensor([list(target_size)], dtype=pooled.dtype, device=pooled.device).expand(n, 2)
    time_ids = torch.cat(
        [original_sizes.to(pooled.device, pooled.dtype), crops_top_left.to(pooled.device, pooled.dtype),
         target],
        dim=1,
    )
    return {"text_embeds": pooled, "time_ids": time_ids}


def _check_added_width(parts: SDComponents, pooled: torch.Tensor) -> None:
    """The UNet's added embedding takes 6 time ids x addition_time_embed_dim + the pooled width."""
    config: Any = parts.unet.config
    expected = config.projection_class_embeddings_input_dim
    got = TIME_IDS * config.addition_time_embed_dim + pooled.shape[-1]
    if expected is not None and got != expected:
        raise ValueError(
            f"the UNet's added embedding takes {expected} numbers but pooled width {pooled.shape[-1]} + "
            f"{TIME_IDS} time ids x {config.addition_time_embed_dim} give {got}; the pooled embedding must "
            "come from this model's text_encoder_2"
        )
