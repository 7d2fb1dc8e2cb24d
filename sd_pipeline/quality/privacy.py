"""Privacy check of published shards: re-open a sample of images, look for metadata.

Ingestion re-encodes from pixels, so nothing should survive; the gate checks that
promise on what was actually written rather than trusting it.
"""

from __future__ import annotations

import io
from typing import Any

from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.storage import Store

# Pillow's names for embedded metadata blocks (the raw XMP packet lands in info["xmp"]);
# any of them in a shard image is a leak.
METADATA_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "iptc", "gps")


def embedded_metadata(jpeg: bytes) -> list[str]:
    """Names of the metadata blocks found in one encoded image (empty when clean)."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg))
    found = [k for k in METADATA_KEYS if img.info.get(k)]
    if len(img.getexif()):
        found.append("exif-tags")
    return sorted(set(found))


def check_shards(store: Store, dataset: str, version: str, sample: int) -> dict[str, Any]:
    """Open up to ``sample`` images spread evenly over the version's shards."""
    from sd_pipeline.ingest.shards import read_shard

    shards = [k for k in store.list(f"{version_prefix(dataset, version)}/shards/") if k.endswith(".tar")]
    if sample <= 0 or not shards:
        return {"sampled": 0, "leaks": 0, "examples": []}
    per_shard = max(1, -(-sample // len(shards)))
    sampled, leaks = 0, 0
    examples: list[dict[str, Any]] = []
    for key in shards:
        samples = list(read_shard(store.get_bytes(key)))
        step = max(1, len(samples) // per_shard)
        for s in samples[::step][:per_shard]:
            if sampled >= sample:
                break
            sampled += 1
            found = embedded_metadata(s.image)
            if found:
                leaks += 1
                if len(examples) < 5:
                    examples.append({"key": s.key, "metadata": found})
    return {"sampled": sampled, "leaks": leaks, "examples": examples}
