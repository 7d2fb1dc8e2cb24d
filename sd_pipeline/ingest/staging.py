"""Shards written while ingestion runs, into a private staging prefix, then published.

The version id is a hash of everything accepted, so it is known only at the end; shards
cannot be written to their final place as they fill. An ingest stages under
``datasets/<name>/staging/<token>/`` (``<token>`` = start time + random suffix), one
sub-prefix per work unit, and the commit moves the shards under the version when it is
known (a rename on ``file://``, a server-side copy on S3). Each shard is streamed to a
local file sample by sample, so memory never holds a shard's images. A killed run leaves
only its staging prefix (cleared after a day by later runs) and, at worst, some shards
under a version with no ``_COMMITTED``, which no reader trusts and the rerun overwrites
with the same bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from sd_pipeline.ingest.shards import ShardSample, ShardWriter
from sd_pipeline.storage import LocalStore, Store

log = logging.getLogger("sd_pipeline.ingest")
STALE_AFTER_S = 24 * 3600


def staging_root(dataset: str) -> str:
    return f"datasets/{dataset}/staging"


def new_staging(dataset: str) -> str:
    """A fresh staging prefix for one ingest; its name starts with the time it was made."""
    return f"{staging_root(dataset)}/{int(time.time())}-{uuid.uuid4().hex[:8]}"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


class _StagedFile:
    """A local file that becomes one store object: written in place for a local store
    (then renamed, so readers never see half of it), else in a temp file then uploaded."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key
        if isinstance(store, LocalStore):
            final = store.local_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
        else:
            fd, tmp = tempfile.mkstemp(prefix="sd-shard-", suffix=".tar")
        self.path = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def finish(self) -> None:
        """Close and publish the file (blocking: an upload on S3)."""
        self.file.close()
        try:
            if isinstance(self.store, LocalStore):
                os.replace(self.path, self.store.local_path(self.key))
            else:
                self.store.put_file(self.key, self.path)
        finally:
            self.path.unlink(missing_ok=True)

    def abandon(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class ShardSink:
    """Samples in, shards of ``shard_size`` out under ``prefix`` (``shard-000000.tar``, ...).

    Uploads to S3 run on a background thread, one at a time, so decoding goes on while a
    full shard travels.
    """

    def __init__(self, store: Store, prefix: str, shard_size: int) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.shard_size = shard_size
        self.shards: list[str] = []
        self._open: _StagedFile | None = None
        self._writer: ShardWriter | None = None
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="sd-shard-upload")
        self._pending: Future[None] | None = None

    def add(self, sample: ShardSample) -> str:
        """Write a sample; returns the name of the shard it lands in."""
        if self._writer is None:
            name = shard_name(len(self.shards))
            self._open = _StagedFile(self.store, f"{self.prefix}/{name}")
            self._writer = ShardWriter(self._open.file)
            self.shards.append(name)
        name = self.shards[-1]
        self._writer.add(sample)
        if self._writer.count >= self.shard_size:
            self._finish_shard()
        return name

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._open is not None
        self._writer.close()
        staged, self._open, self._writer = self._open, None, None
        self._wait()
        if isinstance(self.store, LocalStore):
            staged.finish()  # a rename: not worth a thread
        else:
            self._pending = self._uploads.submit(staged.finish)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> list[str]:
        """Finish the last shard and wait for uploads; returns the shard names."""
        if self._writer is not None:
            self._finish_shard()
        self._wait()
        self._uploads.shutdown()
        return list(self.shards)

    def abort(self) -> None:
        """Drop what is being written (after an error); finished shards stay staged."""
        if self._open is not None:
            self._open.abandon()
            self._open, self._writer = None, None
        self._uploads.shutdown(wait=True, cancel_futures=True)


def write_samples(store: Store, key: str, samples: list[ShardSample]) -> None:
    """One shard of ``samples`` in the given order, stored at ``key`` (commit's rewrites)."""
    staged = _StagedFile(store, key)
    try:
        writer = ShardWriter(staged.file)
        for sample in samples:
            writer.add(sample)
        writer.close()
    except BaseException:
        staged.abandon()
        raise
    staged.finish()


def clear_stale_staging(store: Store, dataset: str, now: float | None = None) -> int:
    """Delete staging prefixes of runs that started more than a day ago (killed runs)."""
    now = time.time() if now is None else now
    root = staging_root(dataset) + "/"
    tokens = {key[len(root) :].split("/", 1)[0] for key in store.list(root)}
    cleared = 0
    for token in tokens:
        started = token.split("-", 1)[0]
        if started.isdigit() and now - int(started) > STALE_AFTER_S:
            cleared += store.delete_prefix(root + token)
            log.info("cleared stale staging %s%s", root, token)
    return cleared
