"""Evaluator models: CLIP (prompt alignment, image-set distance) and a safety classifier.

Their weights are never downloaded here: a config names a pre-staged folder (local path,
``file://`` or ``s3://`` prefix). A metric whose evaluator is not configured is skipped,
and the results say why; one that runs records the weights that produced it (URI + digest).

CLIP score is computed with transformers' ``CLIPModel`` directly, as torchmetrics defines
it (100 x the cosine of image and prompt embeddings, floored at 0, averaged over pairs),
without adding torchmetrics as a dependency. ``fd_clip`` and ``kid_clip`` are the Fréchet
distance and kernel inception distance computed on CLIP image embeddings instead of
Inception-v3 features: Inception FID needs torch-fidelity, which needs torchvision, and
torchvision does not import beside this torch (docs/registry.md).
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

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

log = logging.getLogger("sd_pipeline.evaluate")

CACHE_MARKER = ".sd_pipeline_cached.json"
FID_INCEPTION_SKIPPED = (
    "Inception-v3 FID/KID needs torch-fidelity, which requires torchvision; torchvision does not "
    "import beside torch 2.13 here, so fd_clip/kid_clip (the same distances on CLIP image "
    "features) are reported instead when evaluate.clip_model is set"
)


@dataclass(frozen=True)
class EvaluatorWeights:
    """Where an evaluator's weights came from, as the results record it."""

    kind: str
    uri: str
    sha256: str

    def describe(self) -> dict[str, str]:
        return {"evaluator": self.kind, "weights": self.uri, "sha256": self.sha256}


def resolve_weights(uri: str, cache_dir: Path, *, endpoint_url: str | None = None) -> Path:
    """A local folder holding the evaluator weights ``uri`` names.

    A local path or ``file://`` URI is used in place; an ``s3://`` prefix is copied once
    into ``cache_dir`` (marker written last) and reused.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"evaluator weights {uri!r} are not a model folder (no config.json); point the "
                "config at a folder saved with save_pretrained"
            )
        return path
    if parsed.scheme != "s3":
        raise ValueError(f"evaluator weights {uri!r}: use a local path, file:///abs/path or s3://bucket/prefix")
    from sd_pipeline.storage import Store

    target = Path(cache_dir) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (target / CACHE_MARKER).is_file():
        return target
    store = Store.from_uri(f"s3://{parsed.netloc}", endpoint_url)
    prefix = parsed.path.strip("/")
    if not store.exists(f"{prefix}/config.json"):
        raise FileNotFoundError(
            f"evaluator weights {uri!r} hold no config.json; upload a save_pretrained folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        store.download_dir(prefix, tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"uri": uri}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class ClipEvaluator:
    """A CLIP model: image and text embeddings, CLIP score, and distances between image sets."""

    def __init__(self, path: Path, weights: EvaluatorWeights, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.weights = weights
        self.device = device
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        self.model.eval()
        self.model.to(device)  # type: ignore[arg-type]  # mypy misreads the wrapped .to
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        text_config: Any = self.model.config.text_config
        self.max_tokens = int(text_config.max_position_embeddings)

    def image_embeddings(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings, one row per image (CPU, float32)."""
        import torch

        rows = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(
                images=[im.convert("RGB") for im in images[i : i + batch_size]], return_tensors="pt"
            )["pixel_values"].to(self.device)
            with torch.no_grad():
                # vision tower + projection, as CLIPModel.forward does; stable across transformers 4/5
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                rows.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        import torch

        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            embeds = self.model.text_projection(pooled).float().cpu()
        return torch.nn.functional.normalize(embeds, dim=-1)

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> float:
        """Mean over (image, its prompt) of 100 x max(cosine, 0), as torchmetrics' CLIPScore."""
        if len(images) != len(prompts):
            raise ValueError(f"clip_score needs one prompt per image; got {len(images)} images, "
                             f"{len(prompts)} prompts")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return float((100.0 * cos.clamp(min=0)).mean())


class SafetyEvaluator:
    """diffusers' StableDiffusionSafetyChecker: the share of images it flags."""

    def __init__(self, path: Path, weights: EvaluatorWeights, device: torch.device) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"safety checker {weights.uri} has no preprocessor_config.json; save its "
                "CLIPImageProcessor into the same folder"
            )
        self.weights = weights
        self.device = device
        self.checker = StableDiffusionSafetyChecker.from_pretrained(
            path, local_files_only=True, use_safetensors=True
        )
        self.checker.eval()
        self.checker.to(device)  # type: ignore[arg-type]
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    def unsafe_rate(self, images: list[Image.Image]) -> float:
        import numpy as np

        rgb = [im.convert("RGB") for im in images]
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
        arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in rgb])
        _, flagged = self.checker(clip_input=pixels, images=arrays)
        return float(sum(bool(f) for f in flagged)) / len(images)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (rows are samples), as in FID.

    The trace of sqrt(S_a S_b) comes from the eigenvalues of S_a^1/2 S_b S_a^1/2, which is
    symmetric, so no complex matrix square root is needed.
    """
    import numpy as np

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set; got {len(a)} and {len(b)}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = float(np.sqrt(np.clip(middle, 0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(value, 0.0)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (x.y/d + 1)^3, as in KID."""
    import numpy as np

    m, n = len(a), len(b)
    if m < 2 or n < 2:
        raise ValueError(f"a kernel distance needs at least 2 samples per set; got {m} and {n}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float(
        (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
        + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
        - 2 * k_ab.mean()
    )


def weights_record(kind: str, uri: str, path: Path) -> EvaluatorWeights:
    from sd_pipeline.models.base import model_digest

    return EvaluatorWeights(kind=kind, uri=uri, sha256=model_digest(path))


def load_evaluators(
    clip_model: str | None,
    safety_checker: str | None,
    device: torch.device,
    cache_dir: Path,
    endpoint_url: str | None = None,
) -> tuple[ClipEvaluator | None, SafetyEvaluator | None, dict[str, Any]]:
    """Load the configured evaluators; the dict describes each one as used or skipped (and why)."""
    described: dict[str, Any] = {}
    clip = safety = None
    if clip_model:
        path = resolve_weights(clip_model, cache_dir, endpoint_url=endpoint_url)
        clip = ClipEvaluator(path, weights_record("clip", clip_model, path), device)
        described["clip"] = {"status": "used", **clip.weights.describe()}
    else:
        described["clip"] = {"status": "skipped", "reason": "evaluate.clip_model is not set; set it to a "
                             "pre-staged CLIP folder (local path or store URI) to get clip_score, "
                             "fd_clip and kid_clip"}
    if safety_checker:
        path = resolve_weights(safety_checker, cache_dir, endpoint_url=endpoint_url)
        safety = SafetyEvaluator(path, weights_record("safety_checker", safety_checker, path), device)
        described["safety_checker"] = {"status": "used", **safety.weights.describe()}
    else:
        described["safety_checker"] = {"status": "skipped", "reason": "evaluate.safety_checker is not set; "
                                       "set it to a StableDiffusionSafetyChecker folder to get unsafe_rate"}
    described["inception"] = {"status": "skipped", "reason": FID_INCEPTION_SKIPPED}
    return clip, safety, described
