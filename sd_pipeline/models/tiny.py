"""A tiny Stable Diffusion with random weights, so the whole pipeline runs offline on a CPU.

It keeps SD's proportions (VAE 8x down, CLIP text encoder, cross-attention UNet) at a size
that trains in seconds; its CLIP tokenizer is trained on the dataset's captions. The same
captions (in any order) and seed always give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("sd_pipeline.models")

MARKER = "sd_pipeline_model.json"
BUILDER_VERSION = 1
RESOLUTION = 64  # pixels; the VAE downsamples 8x, so latents are 8x8
MODEL_MAX_LENGTH = 32  # tokens per caption, the text encoder's positions
VOCAB_CAP = 2048  # BPE stops earlier when no pair occurs twice
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def build_tiny_sd(out_dir: Path, captions: list[str], seed: int = 0) -> Path:
    """Build (or keep) a tiny diffusers-format SD pipeline in ``out_dir`` and return the path.

    A folder that already holds the model built from the same captions and seed is returned
    untouched; one built by this function from other inputs is replaced. The model is
    assembled in a sibling temp folder and renamed into place, ``sd_pipeline_model.json``
    written last, so ``out_dir`` never holds half a model.
    """
    out_dir = Path(out_dir)
    if not captions:
        raise ValueError(
            "captions is empty; the tiny model's tokenizer is trained on the dataset's "
            "captions, so pass at least one"
        )
    ordered = sorted(captions)  # the model depends on the captions, not their order
    inputs = _inputs_digest(ordered, seed)
    marker = out_dir / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("inputs_sha256") == inputs:
            log.info("tiny SD model in %s is up to date (%d captions, seed %d)",
                     out_dir, len(ordered), seed)
            return out_dir
        log.info("tiny SD model in %s was built from other captions or seed; rebuilding", out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and has no {MARKER}, so it was not built by "
            "build_tiny_sd; remove it or choose another folder"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        info = _build(tmp, ordered, seed, inputs)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny SD model in %s: vocabulary %d tokens from %d captions, seed %d",
             out_dir, info["vocab_size"], len(ordered), seed)
    return out_dir


def _inputs_digest(ordered_captions: list[str], seed: int) -> str:
    payload = json.dumps(
        {"builder_version": BUILDER_VERSION, "seed": seed, "captions": ordered_captions},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _build(folder: Path, captions: list[str], seed: int, inputs: str) -> dict[str, Any]:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = folder / "_vocab"
    vocab = write_clip_vocab(tokenizer_dir, captions)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MODEL_MAX_LENGTH)
    shutil.rmtree(tokenizer_dir)

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
        vae = AutoencoderKL(
            sample_size=RESOLUTION,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32, 32),  # four blocks: 8x down, like SD's VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MODEL_MAX_LENGTH,
                bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS],
            )
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)

    info = {
        "kind": "tiny-stable-diffusion",
        "description": "Random-weight Stable Diffusion in SD's proportions for offline CPU runs; "
        "its CLIP tokenizer is trained on the dataset captions.",
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "captions": len(captions),
        "inputs_sha256": inputs,
        "resolution": RESOLUTION,
        "model_max_length": MODEL_MAX_LENGTH,
        "vocab_size": len(vocab),
    }
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
