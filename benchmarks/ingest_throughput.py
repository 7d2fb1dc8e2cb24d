"""Ingest throughput: images/s of `sd-pipeline ingest` with 1 process vs the worker pool.

Generates N JPEG photos-like images (512-1024 px, noise + shapes) once, then ingests the
same folder into two fresh stores side by side. Prints figures and the ratio; asserts
nothing about time (machines are shared and noisy: compare the ratio).

    .venv/bin/python benchmarks/ingest_throughput.py --count 400 --resolution 512
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        w, h = rng.randint(512, 1024), rng.randint(512, 1024)
        arr = np_rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        name = f"images/{i:06d}.jpg"
        (root / name).write_bytes(buf.getvalue())
        lines.append(json.dumps({"file_name": name, "text": f"a noisy picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(raw: Path, store: Path, resolution: int, workers: int) -> tuple[float, dict]:
    cfg = parse_config(
        {
            "storage": {"root": f"file://{store}"},
            "dataset": {
                "source": {"uri": f"file://{raw}"},
                "resolution": resolution,
                "workers": workers,
                "shard_size": 1000,
            },
        }
    )
    started = time.perf_counter()
    summary = ingest(cfg)
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = make_folder(Path(tmp) / "raw", args.count)
        results = {}
        for workers in (1, os.cpu_count() or 2):
            seconds, summary = run(raw, Path(tmp) / f"store-{workers}", args.resolution, workers)
            results[workers] = seconds
            print(
                f"workers={workers}: {args.count} images in {seconds:.2f}s = "
                f"{args.count / seconds:.0f} img/s (version {summary['version']})"
            )
        w1, wn = results[1], results[max(results)]
        print(f"pool speed-up: {w1 / wn:.2f}x with {max(results)} workers on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
