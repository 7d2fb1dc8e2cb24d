"""Unsafe-content checks: a caption blocklist and a pluggable image classifier.

The classifier is any Hugging Face image-classification model in a local folder (an
NSFW detector in production, pre-staged since no hub is reached at run time); its
unsafe score is the summed probability of the configured unsafe labels. The embedded
home builds a tiny randomly initialised one so that the same loading and scoring code
runs everywhere: its scores carry no meaning, which the data card says.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=16)
def _blocklist_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w.strip().lower()) for w in words if w.strip())
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def blocklisted_term(caption: str, blocklist: list[str]) -> str | None:
    """The first blocklisted word or phrase in ``caption`` (whole words, any case), if any."""
    pattern = _blocklist_pattern(tuple(blocklist))
    match = pattern.search(caption) if pattern else None
    return match.group(0).lower() if match else None


class ImageSafetyClassifier:
    """Scores JPEG bytes with a local image-classification model (safetensors only)."""

    def __init__(self, path: Path, unsafe_labels: list[str], batch_size: int = 32) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.path = Path(path)
        self.model = AutoModelForImageClassification.from_pretrained(
            self.path, use_safetensors=True, local_files_only=True
        ).eval()
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        wanted = {w.lower() for w in unsafe_labels}
        self.unsafe_ids = sorted(i for i, name in labels.items() if name in wanted)
        if not self.unsafe_ids:
            raise ValueError(
                f"classifier {self.path} has labels {sorted(labels.values())}, none of which is in "
                f"safety.unsafe_labels={sorted(wanted)}; set safety.unsafe_labels to its unsafe labels"
            )
        self.batch_size = batch_size
        self._torch = torch

    def score(self, jpegs: list[bytes]) -> list[float]:
        from PIL import Image

        scores: list[float] = []
        for i in range(0, len(jpegs), self.batch_size):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[i : i + self.batch_size]]
            inputs = self.processor(images=images, return_tensors="pt")
            with self._torch.inference_mode():
                probs = self.model(**inputs).logits.float().softmax(dim=-1)
            scores.extend(probs[:, self.unsafe_ids].sum(dim=-1).tolist())
        return scores


def build_tiny_safety_classifier(out_dir: Path, seed: int = 0) -> Path:
    """A tiny ViT image classifier (labels safe/nsfw), random init, in Hugging Face format."""
    out_dir = Path(out_dir)
    marker = out_dir / "sd_pipeline_classifier.json"
    if marker.exists():
        return out_dir
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "safe", 1: "nsfw"},
        label2id={"safe": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out_dir)
    marker.write_text(
        json.dumps(
            {
                "what": "tiny random-init safety classifier for the embedded "
                "demo; its scores carry no meaning",
                "seed": seed,
            }
        )
    )
    return out_dir


def classifier_info(classifier: ImageSafetyClassifier | None) -> dict[str, Any]:
    if classifier is None:
        return {"classifier": None}
    return {"classifier": str(classifier.path), "unsafe_label_ids": classifier.unsafe_ids}
