"""The base model a run starts from: find it (local folder or ``s3://`` prefix), load it, hash it.

Models are diffusers-format folders; weights load from safetensors only and no model code
is ever taken from the model itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sd_pipeline.home import EmbeddedHome
from sd_pipeline.storage import COMMITTED, Store, local_target

if TYPE_CHECKING:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
    names = {key: key[len(prefix) + 1 :] if prefix else key for key in keys}
    for key, name in names.items():  # before anything is copied: no key may climb out of the cache
        local_target(target, name, key)
    if not any(k.endswith(required_file) for k in keys):
        raise FileNotFoundError(
            f"model {base!r} holds no {required_file}; upload a model folder "
            "(save_pretrained output) under that prefix"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for key in keys:
            store.get_file(key, local_target(tmp, names[key], key))
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


SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                  "StableDiffusionXLInpaintPipeline")  # one layout: two tokenizers and text encoders


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model, loaded apart so each can be frozen or trained.

    SD 1.x/2.x have one tokenizer and text encoder; SDXL adds ``tokenizer_2`` and
    ``text_encoder_2`` (a ``CLIPTextModelWithProjection`` whose pooled output the UNet also
    takes). ``sd_pipeline.models.conditioning`` turns captions into what either UNet expects.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[CLIPTextModel | CLIPTextModelWithProjection]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def freeze(self, device: torch.device) -> None:
        """No gradients, eval mode, on ``device``: the encoders always, the UNet until trained."""
        for module in (self.vae, *self.text_encoders, self.unet):
            module.requires_grad_(False)
            module.eval()
            module.to(device)  # type: ignore[arg-type]  # mypy misreads the wrapped .to


def pipeline_class_name(path: Path) -> str:
    """``_class_name`` of a diffusers folder's ``model_index.json`` (which pipeline it is)."""
    index = Path(path) / "model_index.json"
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(
            f"{index} is missing or has no _class_name ({err}); point model.base at a folder "
            "saved with a diffusers pipeline's save_pretrained"
        ) from err


def load_components(path: Path, dtype: torch.dtype | None = None) -> SDComponents:
    """Load a local diffusers SD or SDXL folder part by part (safetensors only, no remote code).

    SDXL is recognised by ``model_index.json``'s ``_class_name`` (``StableDiffusionXL*``); it
    must hold both text encoders (SDXL's refiner, which has only the second, cannot be a base).
    """
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    class_name = pipeline_class_name(path)
    index = json.loads((path / "model_index.json").read_text())
    sdxl = class_name in SDXL_PIPELINES
    needed = ["tokenizer", "text_encoder", "vae", "unet", "scheduler"]
    needed += ["tokenizer_2", "text_encoder_2"] if sdxl else []
    missing = [name for name in needed if not (index.get(name) or [None])[-1]]
    if missing:
        raise ValueError(
            f"model {path} ({class_name}) has no {', '.join(missing)}; sd-pipeline fine-tunes the UNet of "
            f"Stable Diffusion 1.x/2.x (StableDiffusionPipeline) or SDXL base ({SDXL_PIPELINES[0]}) "
            "models, so set model.base to one of those"
        )
    common: dict[str, Any] = {"local_files_only": True}
    weights: dict[str, Any] = {**common, "use_safetensors": True, "dtype": dtype}
    parts = SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )
    if sdxl:
        parts.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common)
        parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", **weights
        )
    return parts


DIGEST_SIDECAR = ".sd-digest.json"
DIGEST_SIDECAR_VERSION = 1


def model_digest(path: Path) -> str:
    """sha256 over every file of a model folder (relative name + content), for lineage.

    Hidden files and store markers are left out, so a cached copy hashes like its source.
    Hashing a multi-GB model on every stage is slow, so each file's sha256 is kept in
    ``.sd-digest.json`` (hidden, so outside the digest) keyed on its size and mtime_ns: only
    files that changed (or are new) are read again. A rewrite that keeps a file's size and
    mtime to the nanosecond goes unnoticed; delete the sidecar after such tampering. A folder
    that cannot be written (a read-only mount) is hashed in full each time.
    """
    root = Path(path)
    known = _read_sidecar(root)
    fresh: dict[str, dict[str, Any]] = {}
    digest = hashlib.sha256()
    reread = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or file.name == COMMITTED:
            continue
        stat = file.stat()
        entry = known.get(rel)
        if not (entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _file_sha256(file)}
            reread += 1
        fresh[rel] = entry
        digest.update(f"{rel}\0{entry['sha256']}\n".encode())
    if fresh != known:
        _write_sidecar(root, fresh)
    log.debug("model digest of %s: %d files, %d read", root, len(fresh), reread)
    return digest.hexdigest()


def _file_sha256(file: Path) -> str:
    content = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            content.update(chunk)
    return content.hexdigest()


def _read_sidecar(root: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((root / DIGEST_SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != DIGEST_SIDECAR_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_sidecar(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Atomically (temp file + rename): a reader sees the old sidecar or the new one."""
    payload = json.dumps({"version": DIGEST_SIDECAR_VERSION, "files": files}, sort_keys=True)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=root, prefix=f"{DIGEST_SIDECAR}.")  # hidden: not digested
        tmp = Path(name)
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        os.replace(tmp, root / DIGEST_SIDECAR)
    except OSError as err:
        log.debug("cannot cache the digest of %s (%s); it is computed in full next time", root, err)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
