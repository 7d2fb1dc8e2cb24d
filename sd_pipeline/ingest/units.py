"""Work units: a source's inputs split into ranges that are checked and staged independently.

A unit is the inputs ``[start, stop)`` of the source's stable record order. Running one
reads those inputs, runs every per-input check (caption, blocklist, image, safety
classifier), drops exact duplicates within the unit and stages, under
``<staging>/units/<index>/``:

- ``shards/``: the unit's samples, except those that look like an earlier sample of the
  unit (near duplicates);
- ``held/``: those near duplicates, kept aside: whether they are quarantined is decided
  by the commit, which sees every unit (a near duplicate's look-alike may itself be
  dropped there, and then it is accepted after all);
- ``candidates-<n>.parquet``: one row per staged sample (the manifest columns plus its
  input index), in parts of ``PART_ROWS`` so memory does not grow with the unit;
  ``quarantine.parquet``: one row per rejected input;
- ``_COMMITTED``, written last, with the unit's counts: a finished unit is never redone.

The commit (``commit.py``) then applies exact and near-duplicate checks across units in
input order, so the accepted set and the version id do not depend on how the inputs were
split.
"""

from __future__ import annotations

import io
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.dedup import NearDuplicateIndex
from sd_pipeline.ingest.examine import Examined, Examiner
from sd_pipeline.ingest.shards import ShardSample
from sd_pipeline.ingest.sources import (
    Deferred,
    Record,
    SourceRejection,
    resolve_in_order,
    source_records,
)
from sd_pipeline.ingest.staging import ShardSink, clear_stale_staging, new_staging
from sd_pipeline.ingest.workers import Workers
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.ingest")

# Manifest columns, in order, with their Arrow types; carried metadata follows as meta_<column>.
MANIFEST_TYPES = {
    "key": "string",
    "shard": "string",
    "split": "string",
    "source": "string",
    "caption": "string",
    "sha256": "string",
    "width": "int64",
    "height": "int64",
    "orig_width": "int64",
    "orig_height": "int64",
    "format": "string",
    "dhash": "string",
    "unsafe_score": "double",
    "unsafe": "bool",
}
MANIFEST_COLUMNS = list(MANIFEST_TYPES)
QUARANTINE_COLUMNS = ["source", "reason", "detail"]
# Unit-only columns: input index; whether the sample is held aside; its staged shard; and,
# on duplicate_image rows, the hash whose first holder the commit names.
INDEX, HELD, STAGED, DUP_OF = "_index", "_held", "_staged_shard", "_sha256"
SAFETY_BATCH = 32  # images per classifier call
PART_ROWS = 2048  # candidate rows per parquet part: what a unit or the commit holds at once


def candidates_key(prefix: str, part: int) -> str:
    return f"{prefix}/candidates-{part:05d}.parquet"


@dataclass(frozen=True)
class Unit:
    """Inputs ``[start, stop)`` of a planned ingest; JSON-able (Airflow maps over these)."""

    staging: str
    index: int
    start: int
    stop: int
    inputs: int  # of the whole plan: the last unit checks the source has no more

    @property
    def prefix(self) -> str:
        return unit_prefix(self.staging, self.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "staging": self.staging,
            "index": self.index,
            "start": self.start,
            "stop": self.stop,
            "inputs": self.inputs,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(str(d["staging"]), int(d["index"]), int(d["start"]), int(d["stop"]), int(d["inputs"]))


def unit_prefix(staging: str, index: int) -> str:
    return f"{staging}/units/{index:06d}"


def split_units(staging: str, inputs: int, unit_size: int) -> list[Unit]:
    """Consecutive ranges of ``unit_size`` inputs (the last may be shorter); at least one."""
    starts = range(0, max(inputs, 1), unit_size)
    return [Unit(staging, i, a, min(a + unit_size, inputs), inputs) for i, a in enumerate(starts)]


def split_of(key: str, holdout_fraction: float) -> str:
    return "holdout" if int(key[:8], 16) / 0xFFFFFFFF < holdout_fraction else "train"


class _SafetyScorer:
    """Scores batches of processed images with the configured classifier (loaded once)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.safety = config.safety
        self.endpoint_url = config.storage.endpoint_url
        self._classifier: Any = None

    @property
    def enabled(self) -> bool:
        return bool(self.safety.classifier)

    def scores(self, jpegs: list[bytes]) -> list[float]:
        if not self.safety.classifier or not jpegs:
            return [float("nan")] * len(jpegs)
        if self._classifier is None:
            from sd_pipeline.home import EmbeddedHome
            from sd_pipeline.models.base import resolve_base_model
            from sd_pipeline.quality.safety import ImageSafetyClassifier

            path = resolve_base_model(
                self.safety.classifier,
                EmbeddedHome.from_env().work_dir / "classifiers",
                endpoint_url=self.endpoint_url,
                required_file="config.json",
            )
            self._classifier = ImageSafetyClassifier(path, self.safety.unsafe_labels)
        scores: list[float] = self._classifier.score(jpegs)
        return scores


class UnitBuilder:
    """Decisions for the inputs of one unit, fed in input order; stages what it keeps."""

    def __init__(self, config: PipelineConfig, store: Store, unit: Unit) -> None:
        ds = config.dataset
        self.config, self.store, self.unit = config, store, unit
        self.safety = config.safety
        self.scorer = _SafetyScorer(config)
        self.quarantine: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []  # the part being filled
        self.parts = self.staged = self.held_count = 0
        self.seen: dict[str, str] = {}  # sha256 -> first candidate of this unit with it
        self.near = (
            NearDuplicateIndex(ds.near_duplicate_distance) if ds.near_duplicate_distance >= 0 else None
        )
        self.shards = ShardSink(store, f"{unit.prefix}/shards", ds.shard_size)
        self.held = ShardSink(store, f"{unit.prefix}/held", ds.shard_size)
        self.scoring: list[Examined] = []
        self.inputs = 0

    def reject(self, index: int, source: str, reason: str, detail: str, dup_of: str | None = None) -> None:
        self.quarantine.append(
            {INDEX: index, "source": source, "reason": reason, "detail": detail, DUP_OF: dup_of}
        )

    def add(self, index: int, outcome: Examined | SourceRejection) -> None:
        """The outcome of one input's own checks, in input order."""
        self.inputs += 1
        if isinstance(outcome, SourceRejection):
            self.reject(index, outcome.source, outcome.reason, outcome.detail)
            return
        self.scoring.append(outcome)
        if len(self.scoring) >= (SAFETY_BATCH if self.scorer.enabled else 1):
            self._score()

    def _score(self) -> None:
        batch, self.scoring = self.scoring, []
        threshold = self.safety.threshold
        for c, score in zip(batch, self.scorer.scores([c.image.jpeg for c in batch]), strict=True):
            unsafe_image = score == score and score >= threshold  # NaN never is
            if unsafe_image and self.safety.action == "quarantine":
                self.reject(
                    c.index,
                    c.item.source,
                    "unsafe_image",
                    f"{c.item.source}: unsafe score {score:.3f} >= safety.threshold={threshold}",
                )
                continue
            self._dedup(c, score, unsafe_image or c.flagged)

    def _dedup(self, c: Examined, score: float, unsafe: bool) -> None:
        source = c.item.source
        first = self.seen.get(c.sha256)
        if first is not None:
            self.reject(
                c.index, source, "duplicate_image", f"{source} has the same bytes as {first}", c.sha256
            )
            return
        self.seen[c.sha256] = source
        held = False
        if self.near is not None:
            held = self.near.find(c.image.dhash) is not None
            if not held:
                self.near.add(c.image.dhash, source)
        key = c.sha256[:20]
        row = {
            INDEX: c.index,
            "key": key,
            "split": split_of(key, self.config.dataset.holdout_fraction),
            "source": source,
            "caption": c.caption,
            "sha256": c.sha256,
            "width": c.image.width,
            "height": c.image.height,
            "orig_width": c.image.orig_width,
            "orig_height": c.image.orig_height,
            "format": c.image.format,
            "dhash": f"{c.image.dhash:048x}",
            "unsafe_score": score,
            "unsafe": bool(unsafe),
            **{f"meta_{k}": v for k, v in c.item.extra.items()},
        }
        sample = ShardSample(
            key, c.image.jpeg, c.caption, {"split": row["split"], "source": source, "sha256": c.sha256}
        )
        row[HELD] = held
        row[STAGED] = (self.held if held else self.shards).add(sample)
        self.rows.append(row)
        self.staged += 1
        self.held_count += held
        if len(self.rows) >= PART_ROWS:
            self._write_part()

    def _write_part(self) -> None:
        _put_parquet(self.store, candidates_key(self.unit.prefix, self.parts), candidate_table(self.rows))
        self.parts += 1
        self.rows = []

    def finish(self, seconds: float) -> dict[str, Any]:
        """Write the unit's tables and marker; returns its summary."""
        if self.scoring:
            self._score()
        shards, held = self.shards.close(), self.held.close()
        expected = self.unit.stop - self.unit.start
        if self.inputs != expected or self.staged + len(self.quarantine) != expected:
            raise AssertionError(  # the contract: nothing lost silently
                f"unit {self.unit.index}: {expected} inputs planned, {self.inputs} read, "
                f"{self.staged} staged + {len(self.quarantine)} quarantined"
            )
        if self.rows or not self.parts:
            self._write_part()
        self.quarantine.sort(key=lambda r: r[INDEX])
        _put_parquet(self.store, f"{self.unit.prefix}/quarantine.parquet", quarantine_table(self.quarantine))
        summary = {
            **self.unit.to_dict(),
            "read": self.inputs,
            "staged": self.staged,
            "held": self.held_count,
            "candidate_parts": self.parts,
            "quarantined": len(self.quarantine),
            "shards": len(shards),
            "held_shards": len(held),
            "seconds": round(seconds, 3),
        }
        self.store.commit(self.unit.prefix, summary)
        return summary

    def abort(self) -> None:
        self.shards.abort()
        self.held.abort()


def candidate_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    meta = sorted({k for r in rows for k in r if k.startswith("meta_")})
    fields = [pa.field(INDEX, pa.int64())]
    fields += [pa.field(c, pa.type_for_alias(t)) for c, t in MANIFEST_TYPES.items() if c != "shard"]
    fields += [pa.field(HELD, pa.bool_()), pa.field(STAGED, pa.string())]
    columns: dict[str, Any] = {f.name: pa.array([r[f.name] for r in rows], f.type) for f in fields}
    for name in meta:
        columns[name] = pa.array([r.get(name) for r in rows])
    return pa.table(columns)


def quarantine_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    schema = pa.schema(
        [
            (INDEX, pa.int64()),
            ("source", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            (DUP_OF, pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _put_parquet(store: Store, key: str, table: Any) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes(key, buf.getvalue())


def plan_ingest(config: PipelineConfig, store: Store) -> list[Unit]:
    """Count the source's inputs (a listing pass: no image is read) and split them into
    units of ``dataset.unit_size`` under a fresh staging prefix; records the plan there."""
    ds = config.dataset
    clear_stale_staging(store, ds.name)
    staging = new_staging(ds.name)
    started = time.perf_counter()
    found = source_records(ds.source, endpoint_url=config.storage.endpoint_url)
    inputs = sum(1 for _ in found.records)
    units = split_units(staging, inputs, ds.unit_size)
    store.put_json(
        f"{staging}/plan.json",
        {
            "dataset": ds.name,
            "source": ds.source.uri,
            "kind": found.kind,
            "inputs": inputs,
            "unit_size": ds.unit_size,
            "units": [u.to_dict() for u in units],
        },
    )
    log.info(
        "planned %s source %s: %d inputs in %d units of up to %d (listed in %.1fs)",
        found.kind,
        ds.source.uri,
        inputs,
        len(units),
        ds.unit_size,
        time.perf_counter() - started,
    )
    return units


def planned_units(store: Store, staging: str) -> list[Unit]:
    """The units recorded by ``plan_ingest`` under ``staging``."""
    plan = store.get_json(f"{staging}/plan.json")
    return [Unit.from_dict(u) for u in plan["units"]]


class UnitInputs(NamedTuple):
    """A unit's indexed inputs, how many reads are worth running at once, and whether the
    deferred reads may run in worker processes (local files, URL downloads) rather than here."""

    records: Iterable[tuple[int, Record | Deferred]]
    read_workers: int
    portable: bool


def unit_records(config: PipelineConfig, unit: Unit) -> UnitInputs:
    """The unit's inputs from a fresh pass over the source. Iterating raises when the source
    no longer has the inputs it had when it was planned."""
    found = source_records(config.dataset.source, endpoint_url=config.storage.endpoint_url)

    def ranged() -> Iterator[tuple[int, Record | Deferred]]:
        count, more = 0, False
        for index, record in enumerate(found.records):
            if index >= unit.stop:
                more = True
                break
            count = index + 1
            if index >= unit.start:
                yield index, record
        if count < unit.stop or (more and unit.stop == unit.inputs):
            now = f"more than {unit.inputs}" if more else str(count)
            raise RuntimeError(
                f"dataset.source {config.dataset.source.uri} changed since the ingest was planned: "
                f"it had {unit.inputs} inputs, now {now}; rerun the ingest (a source must not change "
                "while it is ingested)"
            )

    return UnitInputs(ranged(), found.read_workers, found.portable)


def run_unit(
    config: PipelineConfig,
    store: Store,
    unit: Unit,
    inputs: UnitInputs | None = None,
    workers: Workers | None = None,
) -> dict[str, Any]:
    """Check and stage the inputs of ``unit``; idempotent (a finished unit returns its summary).

    ``inputs`` default to ``unit_records``; ``workers`` is a pool shared with other units
    (default: one for this unit).
    """
    if store.is_committed(unit.prefix):
        summary: dict[str, Any] = store.get_json(f"{unit.prefix}/_COMMITTED")
        log.info("unit %d of %s already staged; reusing it", unit.index, unit.staging)
        return summary
    store.delete_prefix(unit.prefix)  # what an interrupted attempt left
    started = time.perf_counter()
    inputs = inputs or unit_records(config, unit)
    own = workers is None
    pool = workers or Workers(Examiner.from_config(config), config.dataset.workers)
    builder = UnitBuilder(config, store, unit)
    try:
        read_ahead = 0
        if inputs.portable:  # workers read the inputs themselves: no image bytes pass through here
            jobs: Iterable[tuple[int, Record | Deferred]] = inputs.records
            read_ahead = inputs.read_workers if inputs.read_workers > 1 else 0  # downloads, at once
        else:  # S3 reads run on this process's threads (one client), then travel to a worker
            jobs = _resolve_indexed(inputs.records, inputs.read_workers)
        entries = ((index, (index, job)) for index, job in jobs)
        for index, outcome in pool.ordered(entries, expected=unit.stop - unit.start, read_ahead=read_ahead):
            builder.add(index, outcome)
        summary = builder.finish(time.perf_counter() - started)
    except BaseException:
        builder.abort()
        raise
    finally:
        if own:
            pool.close()
    log.info(
        "unit %d (inputs %d-%d): %d staged (%d held as near duplicates), %d quarantined in %.1fs",
        unit.index,
        unit.start,
        unit.stop - 1,
        summary["staged"],
        summary["held"],
        summary["quarantined"],
        summary["seconds"],
    )
    return summary


def _resolve_indexed(
    records: Iterable[tuple[int, Record | Deferred]], workers: int
) -> Iterator[tuple[int, Record]]:
    """Read deferred inputs concurrently, keeping input order and indexes."""
    indexes: deque[int] = deque()

    def bare() -> Iterator[Record | Deferred]:
        for index, record in records:
            indexes.append(index)
            yield record

    for record in resolve_in_order(bare(), workers):
        yield indexes.popleft(), record
