"""The imagefolder source: a folder of images and ``metadata.jsonl`` (file_name + text).

This is the Hugging Face ``imagefolder`` convention. Every metadata line and every image
file becomes exactly one ``SourceItem`` or one quarantine record, never neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
CAPTION_KEYS = ("text", "caption")


@dataclass(frozen=True)
class SourceItem:
    source: str  # path relative to the source root, as the metadata names it
    data: bytes
    caption: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceRejection:
    source: str
    reason: str
    detail: str


def read_imagefolder(root: Path) -> Iterator[SourceItem | SourceRejection]:
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} does not exist; an imagefolder source needs metadata.jsonl with "
            "one JSON object per line holding file_name and text"
        )
    listed: set[str] = set()
    with meta.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"metadata.jsonl:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield SourceRejection(where, "bad_metadata", f"line {lineno} is not JSON: {err}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                yield SourceRejection(where, "bad_metadata", f"line {lineno} has no file_name string")
                continue
            name = row["file_name"]
            if name in listed:
                yield SourceRejection(where, "duplicate_entry", f"{name} is listed again on line {lineno}")
                continue
            listed.add(name)
            caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
            path = (root / name).resolve()
            if root.resolve() not in path.parents:
                yield SourceRejection(name, "bad_metadata", f"{name} points outside the source folder")
                continue
            if not path.is_file():
                yield SourceRejection(name, "missing_file", f"{name} is listed on line {lineno} but does not exist")
                continue
            if not isinstance(caption, str):
                yield SourceRejection(name, "missing_caption", f"{name} has no text/caption string on line {lineno}")
                continue
            extra = {k: v for k, v in row.items() if k not in ("file_name", *CAPTION_KEYS)}
            yield SourceItem(name, path.read_bytes(), caption, extra)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            rel = path.relative_to(root).as_posix()
            if rel not in listed:
                yield SourceRejection(rel, "unlisted_file", f"{rel} is not named in metadata.jsonl, so it has no caption")
