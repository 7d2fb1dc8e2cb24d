"""The checks that look at one input alone, run in worker processes: read it (when its read
was deferred there), caption, blocklist, image; then hash its bytes.

Kept apart from the rest of ingest so a worker process imports only this, Pillow and the
source readers (no pydantic, pyarrow or boto3): each worker starts in about 0.1 s.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from sd_pipeline.ingest.images import ProcessedImage, Rejection, process_image
from sd_pipeline.ingest.sources import Deferred, Record, SourceItem, SourceRejection
from sd_pipeline.quality.safety import blocklisted_term

if TYPE_CHECKING:
    from sd_pipeline.config import PipelineConfig


def check_caption(caption: str, max_chars: int) -> Rejection | str:
    """Return the cleaned caption or why it cannot be used."""
    text = unicodedata.normalize("NFC", caption).strip()
    if not text:
        return Rejection("empty_caption", "caption is empty or whitespace only")
    if any(unicodedata.category(c) == "Cc" for c in text):
        return Rejection("bad_caption", "caption holds control characters")
    if len(text) > max_chars:
        return Rejection("caption_too_long", f"caption has {len(text)} characters, above {max_chars}")
    return text


def image_check(config: PipelineConfig) -> partial[ProcessedImage | Rejection]:
    ds = config.dataset
    return partial(
        process_image,
        resolution=ds.resolution,
        min_side=ds.min_side,
        max_aspect_ratio=ds.max_aspect_ratio,
        max_pixels=ds.max_pixels,
        resize_filter=ds.resize_filter,
        crop=ds.crop,
    )


@dataclass(frozen=True)
class Examined:
    """An input that passed every check made on it alone (bytes dropped: only the image
    made of them travels back from a worker)."""

    index: int
    item: SourceItem  # with empty data
    caption: str  # cleaned
    flagged: bool  # caption holds a blocklisted term and safety.action is flag
    sha256: str  # of the input bytes
    image: ProcessedImage


@dataclass(frozen=True)
class Examiner:
    """The checks one input needs and nothing else does: read it (if its read was deferred
    to here), caption, blocklist, image. Picklable, so it runs in worker processes."""

    check: partial[ProcessedImage | Rejection]
    caption_max_chars: int
    blocklist: tuple[str, ...]
    quarantine_unsafe: bool  # safety.action is quarantine

    @classmethod
    def from_config(cls, config: PipelineConfig) -> Examiner:
        return cls(
            image_check(config),
            config.dataset.caption_max_chars,
            tuple(config.safety.caption_blocklist),
            config.safety.action == "quarantine",
        )

    def __call__(self, job: tuple[int, Record | Deferred]) -> Examined | SourceRejection:
        index, pending = job
        record = pending if isinstance(pending, SourceItem | SourceRejection) else pending()
        if isinstance(record, SourceRejection):
            return record
        source = record.source
        caption = check_caption(record.caption, self.caption_max_chars)
        if isinstance(caption, Rejection):
            return SourceRejection(source, caption.reason, f"{source}: {caption.detail}")
        term = blocklisted_term(caption, list(self.blocklist))
        if term is not None and self.quarantine_unsafe:
            return SourceRejection(
                source,
                "unsafe_caption",
                f"{source}: caption contains blocklisted {term!r} (safety.caption_blocklist)",
            )
        result = self.check(record.data, name=source)
        if isinstance(result, Rejection):
            return SourceRejection(source, result.reason, result.detail)
        digest = hashlib.sha256(record.data).hexdigest()
        item = SourceItem(source, b"", record.caption, record.extra)
        return Examined(index, item, caption, term is not None, digest, result)
