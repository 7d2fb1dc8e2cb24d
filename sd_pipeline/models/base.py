"""The base model a run starts from: find it (local folder or ``s3://`` prefix), load it, hash it.

Models are diffusers-format folders; weights load from safetensors only and no model code
is ever taken from the model itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sd_pipeline.home import EmbeddedHome
from sd_pipeline.storage import COMMITTED, Store

if TYPE_CHECKING:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger("sd_pipeline.models")

CACHE_MARKER = ".sd_pipeline_cached.json"


def default_cache_dir() -> Path:
    """Where ``s3://`` base models are cached: ``<SD_PIPELINE_HOME>/work/base-models``."""
    return EmbeddedHome.from_env().work_dir / "base-models"


def resolve_base_model(
    base: str, cache_dir: Path, *, endpoint_url: str | None = None, required_file: str = "model_index.json"
) -> Path:
    """Return a local folder holding the model ``base`` names.

    A local path (or ``file://`` URI) is returned as is. An ``s3://bucket/prefix`` is copied
    once into ``cache_dir/<hash of the URI>`` (marker written last) and reused after that,
    so a model prefix must not change once published: publish a new prefix instead.
    """
    parsed = urlparse(base)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else base).expanduser()
        if not (path / required_file).is_file():
            raise FileNotFoundError(
                f"model {base!r} is not a saved model folder (no {required_file}); "
                "set model.base to a folder saved with save_pretrained, or build the demo model "
                "with sd_pipeline.models.tiny.build_tiny_sd"
            )
        return path
    if parsed.scheme != "s3":
        raise ValueError(f"base model {base!r}: use a local path, file:///abs/path or s3://bucket/prefix")

    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    target = Path(cache_dir) / hashlib.sha256(base.rstrip("/").encode()).hexdigest()[:16]
    if (target / CACHE_MARKER).is_file():
        return target
    store = Store.from_uri(f"s3://{bucket}", endpoint_url)
    keys = [k for k in store.list(prefix) if not k.endswith(f"/{COMMITTED}")]
    if not any(k.endswith(required_file) for k in keys):
        raise FileNotFoundError(
            f"model {base!r} holds no {required_file}; upload a model folder "
            "(save_pretrained output) under that prefix"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for key in keys:
            store.get_file(key, tmp / (key[len(prefix) + 1 :] if prefix else key))
        (tmp / CACHE_MARKER).write_text(json.dumps({"uri": base, "files": len(keys)}))
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier copy
        try:
            tmp.rename(target)
        except OSError:
            if not (target / CACHE_MARKER).is_file():  # else another process just cached it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached base model %s (%d files) in %s", base, len(keys), target)
    return target


@dataclass
class SDComponents:
    """The five parts of a Stable Diffusion model, loaded apart so each can be frozen or trained."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    def freeze(self, device: torch.device) -> None:
        """No gradients, eval mode, on ``device``: the encoders always, the UNet until trained."""
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.eval()
            module.to(device)  # type: ignore[arg-type]  # mypy misreads the wrapped .to


def load_components(path: Path, dtype: torch.dtype | None = None) -> SDComponents:
    """Load a local diffusers SD folder part by part (safetensors only, no remote code)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    common: dict[str, Any] = {"local_files_only": True}
    weights: dict[str, Any] = {**common, "use_safetensors": True, "dtype": dtype}
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


def model_digest(path: Path) -> str:
    """sha256 over every file of a model folder (relative name + content), for lineage.

    Hidden files and store markers are left out, so a cached copy hashes like its source.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or file.name == COMMITTED:
            continue
        content = hashlib.sha256()
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                content.update(chunk)
        digest.update(f"{rel}\0{content.hexdigest()}\n".encode())
    return digest.hexdigest()
