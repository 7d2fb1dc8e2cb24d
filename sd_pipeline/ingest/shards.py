"""Webdataset shards: plain tar files, one sample = ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``.

The format is the one webdataset, img2dataset and most trainers read, so a version can be
consumed by other tools too. Members have fixed tar headers (mtime 0, no owner) and a
fixed order (ingest: input order; ``write_shard``: key order), so the same samples always
make byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO


@dataclass(frozen=True)
class ShardSample:
    key: str
    image: bytes  # encoded JPEG
    caption: str
    meta: dict[str, Any]


BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a multiple of this


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def _tarfile_header(name: str, size: int) -> bytes:
    return _info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("x", 0)


def _header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for ``_info(name, size)``: its own header for a
    one-letter name with the name, size and checksum put in, at a fifth of its cost for the
    short ASCII names ingest uses; anything else goes through tarfile itself.
    ``tests/test_ingest.py`` checks the two agree byte for byte."""
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        return _tarfile_header(name, size)
    head = bytearray(_TEMPLATE)
    head[0:100] = name.encode("ascii").ljust(100, b"\0")
    head[124:136] = b"%011o\0" % size
    head[148:156] = b"        "  # the checksum counts its own field as spaces
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


class ShardWriter:
    """One shard written sample by sample to a binary file, in the order they are added:
    ingest streams shards to disk instead of holding a shard's images in memory. The bytes
    are those ``tarfile`` writes in USTAR format (fixed headers: mtime 0, mode 644, no owner)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.file = fileobj
        self.offset = 0
        self.count = 0

    def _member(self, name: str, data: bytes) -> None:
        pad = -len(data) % BLOCK
        self.file.write(_header(name, len(data)))
        self.file.write(data)
        if pad:
            self.file.write(b"\0" * pad)
        self.offset += BLOCK + len(data) + pad

    def add(self, s: ShardSample) -> None:
        self._member(f"{s.key}.jpg", s.image)
        self._member(f"{s.key}.txt", s.caption.encode("utf-8"))
        self._member(f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        """End the archive as tarfile does: two zero blocks, then zeros to a whole record."""
        end = self.offset + 2 * BLOCK
        self.file.write(b"\0" * (2 * BLOCK + -end % RECORD))


def write_shard(samples: list[ShardSample]) -> bytes:
    """Serialize samples (any order) into one deterministic tar, in key order."""
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    for s in sorted(samples, key=lambda s: s.key):
        writer.add(s)
    writer.close()
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
