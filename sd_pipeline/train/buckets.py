"""Aspect-ratio buckets and the seeded batch schedule over them.

Each image goes to the bucket whose aspect ratio is nearest its own (in log space), is
resized to cover the bucket and centre-cropped; a batch never mixes buckets. The schedule
is a pure function of (bucket sizes, batch size, seed, step), so the data position of a
run is its step number: a resumed run draws exactly the batches the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @classmethod
    def parse(cls, name: str) -> Bucket:
        h, _, w = name.partition("x")
        return cls(int(h), int(w))


def make_buckets(resolution: int, step: int, max_aspect: float, enabled: bool = True) -> list[Bucket]:
    """Buckets of at most ``resolution``^2 pixels, sides multiples of ``step`` (square first).

    For each width the tallest height that keeps the area within budget is taken, as SD
    trainers do; ``enabled=False`` (or a step that leaves no choice) gives the square only.
    """
    square = Bucket(resolution, resolution)
    if not enabled:
        return [square]
    budget = resolution * resolution
    found = {square}
    width = step
    while width <= resolution * max_aspect:
        height = (budget // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect + 1e-9:
            found.add(Bucket(height, width))
        width += step
    return [square, *sorted(b for b in found if b != square)]


def nearest_bucket(buckets: list[Bucket], width: int, height: int) -> Bucket:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), b != buckets[0]))


def cover_and_crop(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized width, height) that covers the bucket, and the (top, left) of the centre crop."""
    scale = max(bucket.width / width, bucket.height / height)
    rw, rh = max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))
    return (rw, rh), ((rh - bucket.height) // 2, (rw - bucket.width) // 2)


def derive_seed(seed: int, *what: object) -> int:
    text = ":".join(str(x) for x in (seed, *what))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class BatchSchedule:
    """Seeded epochs of single-bucket batches; ``batch(step)`` for 1-based micro-steps.

    Every epoch shuffles each bucket, cuts it into batches (the last one of a bucket may be
    smaller: nothing is dropped) and shuffles the order of all batches.
    """

    def __init__(self, bucket_sizes: list[int], batch_size: int, seed: int) -> None:
        if not any(bucket_sizes):
            raise ValueError("no samples to schedule")
        self.sizes = tuple(bucket_sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = sum(math.ceil(n / batch_size) for n in bucket_sizes)

    def small_buckets(self) -> dict[int, int]:
        """Buckets with fewer samples than a batch: {bucket index: samples} (reported, kept)."""
        return {i: n for i, n in enumerate(self.sizes) if 0 < n < self.batch_size}

    def batch(self, step: int) -> tuple[int, list[int]]:
        epoch, pos = divmod(step - 1, self.per_epoch)
        return self._epoch(epoch)[pos]

    @lru_cache(maxsize=2)  # noqa: B019 - a schedule lives as long as its run
    def _epoch(self, epoch: int) -> tuple[tuple[int, list[int]], ...]:
        import torch

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        batches: list[tuple[int, list[int]]] = []
        for bucket, n in enumerate(self.sizes):
            order = torch.randperm(n, generator=gen).tolist()
            batches.extend((bucket, order[i : i + self.batch_size]) for i in range(0, n, self.batch_size))
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        return tuple(batches[i] for i in shuffle)
