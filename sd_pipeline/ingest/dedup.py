"""Near-duplicate detection over colour difference hashes, in sub-quadratic time.

Pigeonhole: if two 192-bit hashes differ in at most ``k`` bits, then cut into ``k + 1``
bands at least one band is identical. So only images sharing a band are compared, and
memory stays one small dict entry per band per kept image.
"""

from __future__ import annotations

from collections import defaultdict

from sd_pipeline.ingest.images import hamming

HASH_BITS = 192


class NearDuplicateIndex:
    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)] if max_distance >= 0 else []
        self._bands = list(zip(edges[:-1], edges[1:], strict=False))
        self._tables: list[dict[int, list[tuple[int, str]]]] = [defaultdict(list) for _ in self._bands]

    def _band_values(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def find(self, h: int) -> tuple[str, int] | None:
        """The first kept image within ``max_distance`` of ``h`` (its name, distance), if any."""
        best: tuple[str, int] | None = None
        for table, value in zip(self._tables, self._band_values(h), strict=True):
            for other, name in table.get(value, ()):
                d = hamming(h, other)
                if d <= self.max_distance and (best is None or d < best[1]):
                    best = (name, d)
        return best

    def add(self, h: int, name: str) -> None:
        for table, value in zip(self._tables, self._band_values(h), strict=True):
            table[value].append((h, name))
