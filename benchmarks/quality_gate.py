"""Quality gate cost on large manifests: the whole GX suite on 10k, 100k and 1M rows.

Prints seconds per size and rows/s; also the cost of importing GX once (paid per task).
Asserts nothing about time.

    .venv/bin/python benchmarks/quality_gate.py --rows 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def manifest(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    side = rng.integers(512, 1500, size=(rows, 2))
    words = np.array(["a", "red", "circle", "on", "blue", "background", "photo", "of", "dog", "cat"])
    captions = [" ".join(words[rng.integers(0, len(words), size=n)]) for n in rng.integers(3, 20, size=rows)]
    return pd.DataFrame(
        {
            "key": [k[:20] for k in keys],
            "shard": [f"shard-{i // 1000:06d}.tar" for i in range(rows)],
            "split": "train",
            "source": [f"images/{i}.jpg" for i in range(rows)],
            "caption": captions,
            "sha256": keys,
            "width": 512,
            "height": 512,
            "orig_width": side[:, 0],
            "orig_height": side[:, 1],
            "unsafe": False,
            "meta_license": "cc0-1.0",
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import great_expectations"], check=True)
    print(
        f"import great_expectations (fresh interpreter, with Python start-up): "
        f"{time.perf_counter() - started:.2f}s"
    )

    from sd_pipeline.config import QualityConfig
    from sd_pipeline.quality.gate import validate_manifest
    from sd_pipeline.quality.suite import GateContext

    cfg = QualityConfig(min_rows=10, caption_max_chars=200, allowed_licenses=["cc0-1.0"])
    validate_manifest(manifest(100), GateContext(0), cfg)  # warm: GX's first context is slower
    for rows in args.rows:
        m = manifest(rows)
        previous = manifest(rows, seed=1)
        started = time.perf_counter()
        result = validate_manifest(
            m,
            GateContext(
                quarantined=rows // 100, reasons={"near_duplicate": 10}, previous=previous, privacy_leaks=0
            ),
            cfg,
        )
        seconds = time.perf_counter() - started
        print(
            f"{rows:>9,} rows: {result.statistics['evaluated_expectations']} expectations in "
            f"{seconds:.2f}s ({rows / seconds:,.0f} rows/s), passed={result.passed}"
        )


if __name__ == "__main__":
    main()
