"""Build a dataset version: source -> checked images -> shards, manifest, quarantine.

The version id is a hash of what the version holds, so ingesting the same input twice
gives the same id and the second run publishes nothing new. The version is committed
(``_COMMITTED`` written last) but not yet accepted: ``LATEST`` moves only after the
quality gate passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.dedup import NearDuplicateIndex
from sd_pipeline.ingest.images import ProcessedImage, Rejection, process_image
from sd_pipeline.ingest.shards import ShardSample
from sd_pipeline.ingest.sources import SourceItem, SourceRejection, iter_source
from sd_pipeline.ingest.staging import ShardSink, clear_stale_staging
from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.quality.safety import blocklisted_term
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.ingest")

MANIFEST_COLUMNS = [
    "key",
    "shard",
    "split",
    "source",
    "caption",
    "sha256",
    "width",
    "height",
    "orig_width",
    "orig_height",
    "format",
    "dhash",
    "unsafe_score",
    "unsafe",
]
QUARANTINE_COLUMNS = ["source", "reason", "detail"]


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


BATCH = 256  # images handed to the worker pool at a time: bounds raw bytes held in memory


def _process_named(data: bytes, name: str, check: Callable[..., Any]) -> ProcessedImage | Rejection:
    return check(data, name=name)


class _LazyPool:
    """A process pool for decoding and resizing, started only once a full batch shows the
    input is big enough to repay its start-up (about a second per worker)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: Executor | None = None

    def get(self, full_batch: bool) -> Executor | None:
        if self.pool is None and full_batch and self.workers > 1:
            import multiprocessing as mp

            # spawn, not fork: the caller may be an Airflow task runner with threads and sockets.
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self.pool


@contextmanager
def _pool(workers: int) -> Iterator[_LazyPool]:
    lazy = _LazyPool(workers)
    try:
        yield lazy
    finally:
        if lazy.pool is not None:
            lazy.pool.shutdown()


def _split_of(key: str, holdout_fraction: float) -> str:
    return "holdout" if int(key[:8], 16) / 0xFFFFFFFF < holdout_fraction else "train"


class _SafetyScorer:
    """Scores each batch of accepted images with the configured classifier (loaded once)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.safety = config.safety
        self.endpoint_url = config.storage.endpoint_url
        self._classifier: Any = None

    def _scores(self, jpegs: list[bytes]) -> list[float]:
        if not self.safety.classifier or not jpegs:
            return [float("nan")] * len(jpegs)
        if self._classifier is None:
            from sd_pipeline.home import EmbeddedHome
            from sd_pipeline.models.base import resolve_base_model
            from sd_pipeline.quality.safety import ImageSafetyClassifier

            path = resolve_base_model(
                self.safety.classifier,
                EmbeddedHome.from_env().work_dir / "classifiers",
                endpoint_url=self.endpoint_url,
                required_file="config.json",
            )
            self._classifier = ImageSafetyClassifier(path, self.safety.unsafe_labels)
        scores: list[float] = self._classifier.score(jpegs)
        return scores

    def apply(
        self,
        rows: list[tuple[dict[str, Any], bytes]],
        quarantine: list[dict[str, str]],
        flagged_captions: dict[str, str],
    ) -> list[tuple[dict[str, Any], bytes]]:
        """Quarantine or flag the unsafe rows of a batch; every kept row gets ``unsafe_score``
        (NaN without a classifier) and ``unsafe`` (classifier, or blocklist with action flag)."""
        kept = []
        for (row, jpeg), score in zip(rows, self._scores([j for _, j in rows]), strict=True):
            unsafe_image = score == score and score >= self.safety.threshold  # NaN never is
            if unsafe_image and self.safety.action == "quarantine":
                quarantine.append(
                    {
                        "source": row["source"],
                        "reason": "unsafe_image",
                        "detail": f"{row['source']}: unsafe score {score:.3f} >= "
                        f"safety.threshold={self.safety.threshold}",
                    }
                )
                continue
            row["unsafe_score"] = score
            row["unsafe"] = bool(unsafe_image or row["source"] in flagged_captions)
            kept.append((row, jpeg))
        return kept


def ingest(config: PipelineConfig) -> dict[str, Any]:
    """Ingest the configured source into a committed dataset version; returns its summary."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    ds = config.dataset
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    started = time.perf_counter()
    accepted: list[dict[str, Any]] = []
    quarantine: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    n_inputs = 0
    check = partial(
        process_image,
        resolution=ds.resolution,
        min_side=ds.min_side,
        max_aspect_ratio=ds.max_aspect_ratio,
        max_pixels=ds.max_pixels,
    )
    pending: list[tuple[SourceItem, str, str]] = []  # (item, clean caption, sha256)
    safety = config.safety
    flagged_captions: dict[str, str] = {}
    dedup = NearDuplicateIndex(ds.near_duplicate_distance) if ds.near_duplicate_distance >= 0 else None
    scorer = _SafetyScorer(config)
    clear_stale_staging(store, ds.name)
    sink = ShardSink(store, ds.name, ds.shard_size)

    def flush(lazy: _LazyPool) -> None:
        pool = lazy.get(full_batch=len(pending) >= BATCH)
        datas = [item.data for item, _, _ in pending]
        names = [item.source for item, _, _ in pending]
        results = (
            pool.map(_process_named, datas, names, [check] * len(datas), chunksize=8)
            if pool
            else map(_process_named, datas, names, [check] * len(datas))
        )
        batch: list[tuple[dict[str, Any], bytes]] = []
        for (item, caption, digest), result in zip(pending, results, strict=True):
            if isinstance(result, Rejection):
                quarantine.append({"source": item.source, "reason": result.reason, "detail": result.detail})
                continue
            if dedup is not None:
                match = dedup.find(result.dhash)
                if match is not None:
                    quarantine.append(
                        {
                            "source": item.source,
                            "reason": "near_duplicate",
                            "detail": f"{item.source} looks like {match[0]} "
                            f"({match[1]} of 192 hash bits differ; "
                            f"dataset.near_duplicate_distance={ds.near_duplicate_distance})",
                        }
                    )
                    continue
                dedup.add(result.dhash, item.source)
            key = digest[:20]
            batch.append(
                (
                    {
                        "key": key,
                        "split": _split_of(key, ds.holdout_fraction),
                        "source": item.source,
                        "caption": caption,
                        "sha256": digest,
                        "width": result.width,
                        "height": result.height,
                        "orig_width": result.orig_width,
                        "orig_height": result.orig_height,
                        "format": result.format,
                        "dhash": f"{result.dhash:048x}",
                        **{f"meta_{k}": v for k, v in item.extra.items()},
                    },
                    result.jpeg,
                )
            )
        for row, jpeg in scorer.apply(batch, quarantine, flagged_captions):
            meta = {"split": row["split"], "source": row["source"], "sha256": row["sha256"]}
            row["shard"] = sink.add(ShardSample(row["key"], jpeg, row["caption"], meta))
            accepted.append(row)
        pending.clear()

    workers = ds.workers or os.cpu_count() or 1
    with _pool(workers) as pool:
        items = iter_source(ds.source, endpoint_url=config.storage.endpoint_url)
        for item in tqdm(items, desc=f"ingest {ds.name}", unit="img", disable=not sys.stderr.isatty()):
            n_inputs += 1
            if isinstance(item, SourceRejection):
                quarantine.append({"source": item.source, "reason": item.reason, "detail": item.detail})
                continue
            caption = check_caption(item.caption, ds.caption_max_chars)
            if isinstance(caption, Rejection):
                quarantine.append(
                    {
                        "source": item.source,
                        "reason": caption.reason,
                        "detail": f"{item.source}: {caption.detail}",
                    }
                )
                continue
            term = blocklisted_term(caption, safety.caption_blocklist)
            if term is not None and safety.action == "quarantine":
                quarantine.append(
                    {
                        "source": item.source,
                        "reason": "unsafe_caption",
                        "detail": f"{item.source}: caption contains blocklisted {term!r} "
                        "(safety.caption_blocklist)",
                    }
                )
                continue
            if term is not None:
                flagged_captions[item.source] = term
            digest = hashlib.sha256(item.data).hexdigest()
            if digest in seen:
                quarantine.append(
                    {
                        "source": item.source,
                        "reason": "duplicate_image",
                        "detail": f"{item.source} has the same bytes as {seen[digest]}",
                    }
                )
                continue
            seen[digest] = item.source
            pending.append((item, caption, digest))
            if len(pending) >= BATCH:
                flush(pool)
        flush(pool)

    sink.close()
    quarantine.sort(key=lambda r: (r["source"], r["reason"]))
    if len(accepted) + len(quarantine) != n_inputs:  # the contract: nothing lost silently
        raise AssertionError(
            f"{n_inputs} inputs but {len(accepted)} accepted + {len(quarantine)} quarantined"
        )

    manifest = pd.DataFrame(
        accepted, columns=MANIFEST_COLUMNS + sorted({k for r in accepted for k in r} - set(MANIFEST_COLUMNS))
    )
    quarantined = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
    processing = {
        "resolution": ds.resolution,
        "min_side": ds.min_side,
        "max_aspect_ratio": ds.max_aspect_ratio,
        "shard_size": ds.shard_size,
        "holdout_fraction": ds.holdout_fraction,
        "format": "jpeg-q95",
        "near_duplicate_distance": ds.near_duplicate_distance,
        "safety": config.safety.model_dump(mode="json"),
    }
    version = hashlib.sha256(
        json.dumps(
            {"manifest": accepted, "quarantine": quarantine, "processing": processing},
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    prefix = version_prefix(ds.name, version)
    summary: dict[str, Any] = {
        "dataset": ds.name,
        "version": version,
        "uri": store.uri(prefix),
        "store": store.root_uri,
        "inputs": n_inputs,
        "accepted": len(accepted),
        "quarantined": len(quarantine),
        "quarantine_reasons": quarantined["reason"].value_counts().sort_index().to_dict(),
        "splits": manifest["split"].value_counts().sort_index().to_dict() if accepted else {},
        "shards": int(manifest["shard"].nunique()) if accepted else 0,
        "source": ds.source.uri,
        "processing": processing,
    }
    if store.is_committed(prefix):
        sink.discard()
        log.info("dataset %s version %s already committed; nothing to write", ds.name, version)
        return {**summary, "created": False}

    sink.publish(prefix)
    for name, frame in (("manifest", manifest), ("quarantine", quarantined)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
        store.put_bytes(f"{prefix}/{name}.parquet", buf.getvalue())
    store.put_json(f"{prefix}/ingest.json", summary)
    store.commit(prefix, {"version": version, "accepted": len(accepted)})
    seconds = time.perf_counter() - started
    log.info(
        "ingested %s/%s: %d inputs -> %d accepted, %d quarantined, %d shards in %.1fs (%.0f img/s)",
        ds.name,
        version,
        n_inputs,
        len(accepted),
        len(quarantine),
        summary["shards"],
        seconds,
        n_inputs / max(seconds, 1e-9),
    )
    return {**summary, "created": True}
