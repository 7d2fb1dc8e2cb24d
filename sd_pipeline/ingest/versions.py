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


def resolve_versions(
    store: Store, dataset: str, spec: str = "latest", *, day: str | None = None
) -> list[str]:
    """The committed, accepted versions that ``dataset.version`` names, in training order.

    - ``latest``: the ``LATEST`` pointer; ``<id>``: that version; ``<id>,<id>,...``: those.
    - ``last:N``: the N newest accepted daily versions (``datasets/<name>/dates/<day>``
      pointers written by the gate), newest first, each version once.
    - ``window:Nd``: the accepted daily versions of the N days up to and including ``day``
      (default: the newest recorded day), newest first.

    A rejected version (a ``REJECTED`` marker) or an unknown id is refused with the reason.
    """
    import datetime as dt

    spec = spec.strip()
    if spec.startswith(("last:", "window:")):
        kind, _, arg = spec.partition(":")
        dates_prefix = f"datasets/{dataset}/dates/"
        days = sorted((k[len(dates_prefix) :] for k in store.list(dates_prefix)), reverse=True)
        if not days:
            raise StoreError(
                f"dataset {dataset!r} has no dated versions ({store.uri(dates_prefix)} is empty); "
                f"{spec!r} needs scheduled or backfilled ingest runs"
            )
        if kind == "window":
            n = int(arg.removesuffix("d"))
            end = dt.date.fromisoformat(day or days[0])
            first = (end - dt.timedelta(days=n - 1)).isoformat()
            days = [d for d in days if first <= d <= end.isoformat()]
        ids: list[str] = []
        for d in days:
            pointed = store.read_pointer(f"{dates_prefix}{d}")
            if pointed and pointed not in ids:
                ids.append(pointed)
        if kind == "last":
            ids = ids[: int(arg)]
        if not ids:
            raise StoreError(f"dataset {dataset!r} has no accepted versions in {spec!r}")
    else:
        ids = [resolve_version(store, dataset, v.strip()) for v in spec.split(",")]
    for version in ids:
        if not store.is_committed(version_prefix(dataset, version)):
            raise StoreError(f"dataset version {dataset}/{version} is not committed in {store.root_uri}")
        if store.exists(f"{version_prefix(dataset, version)}/REJECTED"):
            raise StoreError(
                f"dataset version {dataset}/{version} failed its quality gate (see "
                f"{store.uri(version_prefix(dataset, version))}/REJECTED); it is not trained on"
            )
    if len(set(ids)) != len(ids):
        raise StoreError(f"dataset.version {spec!r} names a version twice")
    return ids
