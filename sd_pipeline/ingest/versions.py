"""Dataset versions in the store: layout, the LATEST pointer, and reading a version back.

``datasets/<name>/versions/<version>/`` holds shards, ``manifest.parquet``,
``quarantine.parquet``, ``quality/`` and ``DATACARD.md``; ``_COMMITTED`` is written last.
A version is accepted (and ``LATEST`` moves to it) only after the quality gate passes.
Training may read several versions at once: ``resolve_versions`` turns ``dataset.version``
(``latest``, ids, ``last:N``, ``window:Nd``) into ids and ``iter_samples_many`` reads them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sd_pipeline.ingest.shards import ShardSample, read_shard
from sd_pipeline.storage import Store, StoreError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("sd_pipeline.ingest")


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


VERSION_ID = re.compile(r"^[0-9a-f]{16}$")
SPEC_GRAMMAR = (
    "latest | <16-hex id> | <id>,<id>,... | last:N | window:Nd (N from 1 to 9999; see docs/ingest.md)"
)


def dates_prefix(dataset: str) -> str:
    """Where the gate records each day's accepted version: ``dates/<YYYY-MM-DD>`` -> id."""
    return f"datasets/{dataset}/dates/"


def is_rejected(store: Store, dataset: str, version: str) -> bool:
    return store.exists(f"{version_prefix(dataset, version)}/REJECTED")


@dataclass(frozen=True)
class VersionSpec:
    """A parsed ``dataset.version``: ``kind`` is latest, ids, last or window."""

    kind: str
    ids: tuple[str, ...] = ()
    count: int = 0  # N of last:N and window:Nd


def parse_version_spec(spec: str) -> VersionSpec:
    """Parse ``dataset.version``; a ValueError names the grammar when it does not fit."""
    text = spec.strip()
    bad = ValueError(f"dataset.version {spec!r} is not one of: {SPEC_GRAMMAR}")
    if text == "latest":
        return VersionSpec("latest")
    for kind, suffix in (("last", ""), ("window", "d")):
        if text.startswith(f"{kind}:"):
            number = text[len(kind) + 1 :]
            if not number.endswith(suffix):
                raise bad
            number = number[: len(number) - len(suffix)]
            if not number.isdigit() or not 1 <= int(number) <= 9999 or number.startswith("0"):
                raise bad
            return VersionSpec(kind, count=int(number))
    ids = tuple(part.strip() for part in text.split(","))
    if not all(VERSION_ID.fullmatch(i) for i in ids):
        raise bad
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset.version {spec!r} names a version twice")
    return VersionSpec("ids", ids=ids)


def _accepted_by_day(store: Store, dataset: str) -> list[tuple[str, str]]:
    """(day, version) of every recorded day, newest day first."""
    prefix = dates_prefix(dataset)
    days = sorted((k[len(prefix) :] for k in store.list(prefix)), reverse=True)
    out = []
    for day in days:
        version = store.read_pointer(prefix + day)
        if version:
            out.append((day, version))
    return out


def resolve_versions(
    store: Store, dataset: str, spec: str = "latest", *, day: str | None = None
) -> list[str]:
    """The committed, accepted versions that ``dataset.version`` names, newest first for
    ``last``/``window`` and in the given order for a list; each version once.

    - ``latest``: the ``LATEST`` pointer (the newest day that passed its gate);
    - ``<id>`` or ``<id>,<id>,...``: exactly those versions;
    - ``last:N``: the N newest accepted daily versions (the ``datasets/<name>/dates/<day>``
      pointers the gate writes), distinct versions;
    - ``window:Nd``: the accepted daily versions of the N days up to and including ``day``
      (YYYY-MM-DD; default: the newest recorded day), distinct versions.

    Named versions that are unknown, not committed or rejected by their gate (a ``REJECTED``
    marker) are refused with the reason. ``last``/``window`` only count accepted days: a day
    whose version was rejected since is skipped (and logged). An empty result is an error.
    """
    parsed = parse_version_spec(spec)
    if parsed.kind == "latest":
        ids = [resolve_version(store, dataset, "latest")]
    elif parsed.kind == "ids":
        ids = list(parsed.ids)
    else:
        ids = _dated_versions(store, dataset, parsed, spec, day)
    for version in ids:
        prefix = version_prefix(dataset, version)
        if not store.is_committed(prefix):
            raise StoreError(
                f"dataset version {dataset}/{version} (dataset.version {spec!r}) is not committed in "
                f"{store.root_uri}: unknown, or its ingest did not finish"
            )
        if is_rejected(store, dataset, version):
            raise StoreError(
                f"dataset version {dataset}/{version} (dataset.version {spec!r}) failed its quality gate "
                f"(see {store.uri(prefix)}/REJECTED); it is not trained on. Fix the data and ingest "
                "again, or name accepted versions"
            )
    return ids


def _dated_versions(store: Store, dataset: str, parsed: VersionSpec, spec: str, day: str | None) -> list[str]:
    import datetime as dt

    recorded = _accepted_by_day(store, dataset)
    if not recorded:
        raise StoreError(
            f"dataset {dataset!r} has no dated versions ({store.uri(dates_prefix(dataset))} is empty); "
            f"dataset.version {spec!r} needs scheduled or backfilled ingest runs that passed their gate"
        )
    if parsed.kind == "window":
        try:
            end = dt.date.fromisoformat(day) if day else dt.date.fromisoformat(recorded[0][0])
        except ValueError:
            raise ValueError(f"window end {day!r} is not a date (YYYY-MM-DD)") from None
        first = (end - dt.timedelta(days=parsed.count - 1)).isoformat()
        recorded = [(d, v) for d, v in recorded if first <= d <= end.isoformat()]
    ids: list[str] = []
    for d, version in recorded:
        if version in ids:
            continue
        if is_rejected(store, dataset, version):
            log.warning(
                "dataset.version %s: skipping %s/%s of %s, rejected by its gate", spec, dataset, version, d
            )
            continue
        ids.append(version)
        if parsed.kind == "last" and len(ids) == parsed.count:
            break
    if not ids:
        raise StoreError(f"dataset {dataset!r} has no accepted versions in dataset.version {spec!r}")
    return ids


def iter_samples_many(
    store: Store, dataset: str, versions: list[str], split: str | None = None
) -> Iterator[ShardSample]:
    """Stream the samples of several versions in turn; an image (by the sha256 of its source
    bytes) that an earlier version already gave is skipped, so overlapping days train once.

    Memory holds 16 bytes per distinct image read, never the images."""
    if len(versions) == 1:
        yield from iter_samples(store, dataset, versions[0], split)
        return
    seen: set[bytes] = set()
    for version in versions:
        for sample in iter_samples(store, dataset, version, split):
            digest = sample.meta.get("sha256")
            if digest:
                key = bytes.fromhex(digest[:32])
                if key in seen:
                    continue
                seen.add(key)
            yield sample
