"""Cost of a base model's lineage digest: full read vs the cached ``.sd-digest.json`` sidecar.

Writes a model-shaped folder (a few large safetensors-sized files plus small configs) of
``--gb`` gigabytes of random bytes, then times ``model_digest`` three ways: no sidecar
(every byte read and hashed), sidecar present and nothing changed (stat only), and one
small config touched (that file re-read). Prints seconds and GB/s. Asserts nothing about time.

    .venv/bin/python benchmarks/model_digest.py --gb 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from sd_pipeline.models.base import DIGEST_SIDECAR, model_digest

# SDXL base in fp16, share of the bytes per file: unet 5.1 GB, text_encoder_2 1.4, vae 0.17, text_encoder 0.25
LAYOUT = {"unet/diffusion_pytorch_model.safetensors": 0.73, "text_encoder_2/model.safetensors": 0.2,
          "text_encoder/model.safetensors": 0.035, "vae/diffusion_pytorch_model.safetensors": 0.025}
CONFIGS = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
           "text_encoder_2/config.json", "scheduler/scheduler_config.json"]


def write_model(root: Path, gigabytes: float) -> int:
    total = 0
    chunk = os.urandom(1 << 24)  # 16 MiB, repeated: hashing cost does not depend on the bytes
    for rel, share in LAYOUT.items():
        size = int(gigabytes * share * (1 << 30))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            left = size
            while left > 0:
                fh.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        total += size
    for rel in CONFIGS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return total


def timed(root: Path) -> tuple[float, str]:
    start = time.perf_counter()
    digest = model_digest(root)
    return time.perf_counter() - start, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="model size in GB (default 2)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sd-digest-bench-"))
    try:
        size = write_model(root, args.gb)
        gb = size / (1 << 30)
        full, first = timed(root)
        cached, second = timed(root)
        (root / "unet/config.json").write_text('{"_class_name": "StableDiffusionXLPipeline", "x": 1}')
        touched, third = timed(root)
        (root / DIGEST_SIDECAR).unlink()
        again, fourth = timed(root)
        assert first == second and third == fourth and third != first  # correctness, not speed
        print(f"model folder: {gb:.2f} GB in {len(LAYOUT) + len(CONFIGS)} files")
        print(f"  no sidecar (read everything)   {full:8.3f} s  {gb / full:6.2f} GB/s")
        print(f"  sidecar, nothing changed       {cached:8.3f} s  {full / cached:8.0f}x faster")
        print(f"  sidecar, one config changed    {touched:8.3f} s  {full / touched:8.0f}x faster")
        print(f"  no sidecar again (page cache)  {again:8.3f} s  {gb / again:6.2f} GB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
