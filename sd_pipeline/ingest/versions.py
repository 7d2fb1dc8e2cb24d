"""Dataset versions in the store: layout, the LATEST pointer, and reading a version back.

``datasets/<name>/versions/<version>/`` holds shards, ``manifest.parquet``,
``quarantine.parquet``, ``quality/`` and ``DATACARD.md``; ``_COMMITTED`` is written last.
A version is accepted (and ``LATEST`` moves to it) only after the quality gate passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sd_pipeline.ingest.shards import ShardSample, read_shard
from sd_pipeline.storage import Store, StoreError

if TYPE_CHECKING:
    import pandas as pd


def version_prefix(dataset: str, version: str) -> str:
    return f"datasets/{dataset}/versions/{version}"


def latest_key(dataset: str) -> str:
    return f"datasets/{dataset}/LATEST"


def resolve_version(store: Store, dataset: str, version: str = "latest") -> str:
    """Turn ``latest`` (or an explicit id) into a committed version id, or explain why not."""
    if version == "latest":
        pointed = store.read_pointer(latest_key(dataset))
        if pointed is None:
            raise StoreError(
                f"dataset {dataset!r} has no accepted version yet ({store.uri(latest_key(dataset))} "
                "is missing); run `sd-pipeline ingest` and `sd-pipeline validate` first"
            )
        version = pointed
    if not store.is_committed(version_prefix(dataset, version)):
        raise StoreError(f"dataset version {dataset}/{version} is not committed in {store.root_uri}")
    return version


def read_manifest(store: Store, dataset: str, version: str) -> pd.DataFrame:
    import pandas as pd
    import pyarrow.parquet as pq

    data = store.get_bytes(f"{version_prefix(dataset, version)}/manifest.parquet")
    table = pq.read_table(pd.io.common.BytesIO(data))
    return table.to_pandas()


def iter_samples(store: Store, dataset: str, version: str, split: str | None = None) -> Iterator[ShardSample]:
    """Stream a version's samples shard by shard; ``split`` is ``train``, ``holdout`` or None."""
    prefix = f"{version_prefix(dataset, version)}/shards/"
    for key in store.list(prefix):
        if not key.endswith(".tar"):
            continue
        for sample in read_shard(store.get_bytes(key)):
            if split is None or sample.meta.get("split") == split:
                yield sample
