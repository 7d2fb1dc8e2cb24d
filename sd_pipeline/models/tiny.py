"""Tiny Stable Diffusion models with random weights, so the whole pipeline runs offline on a CPU.

Two kinds: SD 1.x-shaped (``build_tiny_sd``) and SDXL-shaped (``build_tiny_sdxl``: two CLIP
text encoders, pooled-text and size conditioning). Both keep their model's proportions (VAE
8x down, cross-attention UNet) at a size that trains in seconds; their CLIP tokenizers are
trained on the dataset's captions. The same captions (in any order), kind and seed always
give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

log = logging.getLogger("sd_pipeline.models")

MARKER = "sd_pipeline_model.json"
BUILDER_VERSION = 1
RESOLUTION = 64  # pixels; the VAE downsamples 8x, so latents are 8x8
MODEL_MAX_LENGTH = 32  # tokens per caption, the text encoder's positions
VOCAB_CAP = 2048  # BPE stops earlier when no pair occurs twice
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


KINDS = {"sd": "build_tiny_sd", "sdxl": "build_tiny_sdxl"}  # kind -> the function that builds it


def build_tiny_sd(out_dir: Path, captions: list[str], seed: int = 0) -> Path:
    """Build (or keep) a tiny diffusers-format SD 1.x pipeline in ``out_dir`` and return the path.

    A folder that already holds the model built from the same captions and seed is returned
    untouched; one built by this module from other inputs is replaced. The model is
    assembled in a sibling temp folder and renamed into place, ``sd_pipeline_model.json``
    written last, so ``out_dir`` never holds half a model.
    """
    return _build_once(Path(out_dir), captions, seed, "sd")


def build_tiny_sdxl(out_dir: Path, captions: list[str], seed: int = 0) -> Path:
    """Like ``build_tiny_sd``, in ``StableDiffusionXLPipeline``'s layout.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``) whose
    hidden sizes differ (32 and 48), so a concatenation in the wrong order or a hidden state
    used as the pooled embedding fails on shapes instead of passing unnoticed; a UNet with
    SDXL's ``text_time`` added conditioning (pooled text + 6 size ids); SD's 8x VAE.
    """
    return _build_once(Path(out_dir), captions, seed, "sdxl")


def build_tiny_model(out_dir: Path, captions: list[str], kind: str = "sd", seed: int = 0) -> Path:
    """``build_tiny_sd`` or ``build_tiny_sdxl`` by ``kind`` (``sd`` or ``sdxl``)."""
    if kind not in KINDS:
        raise ValueError(f"tiny model kind {kind!r} is unknown; use one of {sorted(KINDS)}")
    return _build_once(Path(out_dir), captions, seed, kind)


def _build_once(out_dir: Path, captions: list[str], seed: int, kind: str) -> Path:
    builder = KINDS[kind]
    if not captions:
        raise ValueError(
            "captions is empty; the tiny model's tokenizer is trained on the dataset's "
            "captions, so pass at least one"
        )
    ordered = sorted(captions)  # the model depends on the captions, not their order
    inputs = _inputs_digest(ordered, seed, kind)
    marker = out_dir / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("inputs_sha256") == inputs:
            log.info("tiny %s model in %s is up to date (%d captions, seed %d)",
                     kind, out_dir, len(ordered), seed)
            return out_dir
        log.info("tiny model in %s was built from other captions, seed or kind; rebuilding as %s",
                 out_dir, kind)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and has no {MARKER}, so it was not built by "
            f"{builder}; remove it or choose another folder"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        info = (_build_sdxl if kind == "sdxl" else _build)(tmp, ordered, seed, inputs)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny %s model in %s: vocabulary %d tokens from %d captions, seed %d",
             kind, out_dir, info["vocab_size"], len(ordered), seed)
    return out_dir


def _inputs_digest(ordered_captions: list[str], seed: int, kind: str = "sd") -> str:
    payload: dict[str, Any] = {"builder_version": BUILDER_VERSION, "seed": seed, "captions": ordered_captions}
    if kind != "sd":  # SD's payload predates kinds; keeping it keeps existing tiny SD folders current
        payload["kind"] = kind
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _caption_tokenizers(
    folder: Path, captions: list[str], pad_tokens: list[str | None]
) -> tuple[list[CLIPTokenizer], dict[str, int]]:
    """One CLIP tokenizer per entry of ``pad_tokens``, all on one vocabulary learned from ``captions``.

    ``None`` keeps CLIP's default pad token (``<|endoftext|>``); SDXL's second tokenizer pads with ``!``.
    """
    from transformers import CLIPTokenizer

    vocab_dir = folder / "_vocab"
    vocab = write_clip_vocab(vocab_dir, captions)
    tokenizers = []
    for pad in pad_tokens:
        extra: dict[str, Any] = {} if pad is None else {"pad_token": pad}
        tokenizers.append(
            CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=MODEL_MAX_LENGTH, **extra)
        )
    shutil.rmtree(vocab_dir)
    return tokenizers, vocab


def _text_config(vocab: dict[str, int], hidden: int, projection: int, pad_token: str = EOS) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[pad_token],
    )


def _vae(**overrides: Any) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(
        sample_size=RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),  # four blocks: 8x down, like SD's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        **overrides,
    )


def _info(kind: str, description: str, captions: list[str], seed: int, inputs: str,
          vocab: dict[str, int]) -> dict[str, Any]:
    return {
        "kind": kind,
        "description": description,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "captions": len(captions),
        "inputs_sha256": inputs,
        "resolution": RESOLUTION,
        "model_max_length": MODEL_MAX_LENGTH,
        "vocab_size": len(vocab),
    }


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training noise schedule (scaled-linear betas, epsilon)."""
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _build(folder: Path, captions: list[str], seed: int, inputs: str) -> dict[str, Any]:
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    (tokenizer,), vocab = _caption_tokenizers(folder, captions, [None])
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,  # diffusers' legacy name: the number of heads
            norm_num_groups=32,
        )
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config(vocab, hidden=32, projection=32))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),  # type: ignore[arg-type]  # a Karras-family enum in the stub
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    info = _info("tiny-stable-diffusion",
                 "Random-weight Stable Diffusion in SD's proportions for offline CPU runs; "
                 "its CLIP tokenizer is trained on the dataset captions.",
                 captions, seed, inputs, vocab)
    (folder / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


# SDXL's shapes, shrunk: hidden sizes of the two text encoders, the pooled (projected) size
# of the second, and the width of each of the 6 size ids' embedding.
SDXL_HIDDEN = (32, 48)
SDXL_POOLED = 40
SDXL_TIME_EMBED = 8
SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def _build_sdxl(folder: Path, captions: list[str], seed: int, inputs: str) -> dict[str, Any]:
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # SDXL's two tokenizers share CLIP's vocabulary; the second (OpenCLIP's) pads with "!".
    (tokenizer, tokenizer_2), vocab = _caption_tokenizers(folder, captions, [None, "!"])
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=sum(SDXL_HIDDEN),  # both encoders' hidden states, concatenated
            attention_head_dim=(2, 4),  # diffusers' legacy name: the number of heads
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=SDXL_TIME_IDS * SDXL_TIME_EMBED + SDXL_POOLED,
            norm_num_groups=32,
        )
        vae = _vae(scaling_factor=0.13025)  # SDXL VAE's factor
        text_encoder = CLIPTextModel(_text_config(vocab, hidden=SDXL_HIDDEN[0], projection=SDXL_HIDDEN[0]))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(vocab, hidden=SDXL_HIDDEN[1], projection=SDXL_POOLED, pad_token="!")
        )
    # SDXL ships an Euler scheduler config; training reads it as DDPM, sampling as DDIM.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    info = _info("tiny-stable-diffusion-xl",
                 "Random-weight SDXL (two CLIP text encoders, pooled-text and size conditioning) "
                 "for offline CPU runs; its CLIP tokenizers are trained on the dataset captions.",
                 captions, seed, inputs, vocab)
    (folder / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def write_clip_vocab(folder: Path, captions: list[str]) -> dict[str, int]:
    """Train a CLIP-style byte-level BPE on ``captions``; write ``vocab.json`` + ``merges.txt``.

    Words are split exactly as transformers' ``CLIPTokenizer`` splits them when it loads
    (NFC, lowercase, CLIP's regex, byte-level), so every learned merge is usable. The
    vocabulary is numbered like CLIP's: 256 bytes, the same with ``</w>``, one token per
    merge in merge order, then the two specials.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer()  # empty vocabulary; we only borrow its word splitting
    bpe = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = clip.backend_tokenizer.normalizer
    bpe.pre_tokenizer = clip.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_CAP,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]

    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + END_OF_WORD for ch in alphabet]
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        encoding="utf-8",
    )
    return vocab


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte value, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = 256 + extra
            extra += 1
    return [chr(stand_in[b]) for b in range(256)]
