"""Webdataset shards: plain tar files, one sample = ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``.

The format is the one webdataset, img2dataset and most trainers read, so a version can be
consumed by other tools too. Members are written in key order with fixed tar headers
(mtime 0, no owner), so the same samples always make byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShardSample:
    key: str
    image: bytes  # encoded JPEG
    caption: str
    meta: dict[str, Any]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(samples: list[ShardSample]) -> bytes:
    """Serialize samples (any order) into one deterministic tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in sorted(samples, key=lambda s: s.key):
            _add(tar, f"{s.key}.jpg", s.image)
            _add(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            _add(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode("utf-8"))
    return buf.getvalue()


def read_shard(data: bytes) -> Iterator[ShardSample]:
    """Yield the samples of one shard in stored order; incomplete samples raise."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            fh = tar.extractfile(member)
            assert fh is not None
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext] = fh.read()
    for key in order:
        parts = groups[key]
        missing = {"jpg", "txt", "json"} - parts.keys()
        if missing:
            raise ValueError(f"shard sample {key!r} lacks {sorted(missing)}")
        yield ShardSample(
            key=key,
            image=parts["jpg"],
            caption=parts["txt"].decode("utf-8"),
            meta=json.loads(parts["json"]),
        )
