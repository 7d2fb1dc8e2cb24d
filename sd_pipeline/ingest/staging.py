"""Shards written while ingestion runs, into a private staging prefix, then published.

The version id is a hash of everything accepted, so it is known only at the end; shards
cannot be written to their final place as they fill. They go to
``datasets/<name>/staging/<token>/`` and are moved under the version when it is known
(a rename on ``file://``, a server-side copy on S3). Memory holds one shard at a time.
A killed run leaves only its staging prefix (cleared after a day by later runs) and, at
worst, some shards under a version with no ``_COMMITTED``, which no reader trusts and
the rerun overwrites with the same bytes.
"""

from __future__ import annotations

import logging
import time
import uuid

from sd_pipeline.ingest.shards import ShardSample, write_shard
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.ingest")
STALE_AFTER_S = 24 * 3600


def staging_root(dataset: str) -> str:
    return f"datasets/{dataset}/staging"


class ShardSink:
    def __init__(self, store: Store, dataset: str, shard_size: int) -> None:
        self.store = store
        self.shard_size = shard_size
        self.prefix = f"{staging_root(dataset)}/{int(time.time())}-{uuid.uuid4().hex[:8]}"
        self.buffer: list[ShardSample] = []
        self.count = 0
        self.shards: list[str] = []

    def add(self, sample: ShardSample) -> str:
        """Queue a sample; returns the name of the shard it lands in."""
        name = f"shard-{self.count // self.shard_size:06d}.tar"
        self.buffer.append(sample)
        self.count += 1
        if len(self.buffer) >= self.shard_size:
            self._write()
        return name

    def _write(self) -> None:
        if not self.buffer:
            return
        name = f"shard-{len(self.shards):06d}.tar"
        self.store.put_bytes(f"{self.prefix}/{name}", write_shard(self.buffer))
        self.shards.append(name)
        self.buffer = []

    def close(self) -> None:
        self._write()

    def publish(self, version_prefix: str) -> None:
        for name in self.shards:
            self.store.move(f"{self.prefix}/{name}", f"{version_prefix}/shards/{name}")
        self.store.delete_prefix(self.prefix)

    def discard(self) -> None:
        self.store.delete_prefix(self.prefix)


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
