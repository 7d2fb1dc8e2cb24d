"""Commit an ingest: merge its staged units into one dataset version and publish it.

Across units, in input order, the commit applies the two checks a unit cannot finish
alone: exact duplicates (the same bytes as an earlier candidate, in any unit) and near
duplicates (a colour hash within ``dataset.near_duplicate_distance`` bits of an earlier
accepted sample). These are the same decisions one pass over all inputs would make, so
the accepted set and the version id are the same however the inputs were split.

Then it names the version by a hash of what it holds (the manifest rows without their
shard, the quarantine rows, the processing settings), and publishes: shards are moved
under the version (rewritten only where a sample was dropped across units), the manifest
and quarantine are written, ``_COMMITTED`` last. Memory holds one unit's rows at a time
plus, per candidate image, its hashes (about 0.3 KB): never images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.dedup import NearDuplicateIndex
from sd_pipeline.ingest.images import JPEG_QUALITY
from sd_pipeline.ingest.shards import ShardSample, read_shard
from sd_pipeline.ingest.staging import shard_name, write_samples
from sd_pipeline.ingest.units import (
    DUP_OF,
    HELD,
    INDEX,
    MANIFEST_COLUMNS,
    MANIFEST_TYPES,
    QUARANTINE_COLUMNS,
    STAGED,
    Unit,
    candidates_key,
)
from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.storage import Store, StoreError

log = logging.getLogger("sd_pipeline.ingest")
RESULT = "result.json"  # in the staging prefix once published: a retried commit returns it


def processing_settings(config: PipelineConfig) -> dict[str, Any]:
    """Everything besides the inputs that shapes a version's content: part of its id."""
    ds = config.dataset
    return {
        "resolution": ds.resolution,
        "min_side": ds.min_side,
        "max_aspect_ratio": ds.max_aspect_ratio,
        "shard_size": ds.shard_size,
        "holdout_fraction": ds.holdout_fraction,
        "format": f"jpeg-q{JPEG_QUALITY}",
        "resize_filter": ds.resize_filter,
        "near_duplicate_distance": ds.near_duplicate_distance,
        "safety": config.safety.model_dump(mode="json"),
        # Only when not the default, so that the ids of centre-cropped versions stay as they were.
        **({"crop": ds.crop} if ds.crop != "center" else {}),
    }


@dataclass
class _Drop:
    reason: str
    of: int  # input index of the sample it repeats or resembles
    distance: int = 0


@dataclass
class _UnitDecisions:
    """What the commit decided for one unit's candidates (positions across its candidate parts)."""

    dropped: dict[int, _Drop] = field(default_factory=dict)
    local_dups: dict[int, int] = field(default_factory=dict)  # quarantine row -> index of first holder


@dataclass
class _ShardPlan:
    """How one final shard is made: a staged shard moved or filtered, or samples gathered."""

    final: str
    staged: str | None = None  # a unit shard moved as it is, or filtered to ``keys``
    keys: list[str] | None = None
    gathered: list[tuple[str, str]] = field(default_factory=list)  # (held shard key, sample key)


def _read_table(store: Store, key: str, columns: list[str] | None = None) -> Any:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get_bytes(key)), columns=columns)


def _sha_key(sha256: str) -> bytes:
    return bytes.fromhex(sha256[:32])  # 128 bits: collisions are not a concern, memory is


def _hash_row(row: dict[str, Any]) -> bytes:
    """A manifest row as hashed into the version id: no shard (layout, not content), and no
    absent metadata (a column missing in one unit and null in another are the same)."""
    kept = {k: v for k, v in row.items() if k != "shard" and not (k.startswith("meta_") and v is None)}
    return json.dumps(kept, sort_keys=True, default=str).encode() + b"\n"


class Commit:
    """The merge of one staged ingest (``staging``) into a version."""

    def __init__(self, config: PipelineConfig, store: Store, staging: str, units: list[Unit]) -> None:
        self.config, self.store, self.staging = config, store, staging
        self.units = sorted(units, key=lambda u: u.index)
        self.ds = config.dataset
        self._check_units()

    def _check_units(self) -> None:
        expected = 0
        missing = []
        self.infos: dict[int, dict[str, Any]] = {}
        for i, unit in enumerate(self.units):
            if unit.index != i or unit.start != expected:
                raise ValueError(
                    f"units of {self.staging} do not tile the inputs: unit {unit.index} "
                    f"starts at {unit.start}, expected unit {i} at {expected}"
                )
            expected = unit.stop
            if self.store.is_committed(unit.prefix):
                self.infos[unit.index] = self.store.get_json(f"{unit.prefix}/_COMMITTED")
            else:
                missing.append(unit.index)
        if self.units and expected != self.units[-1].inputs:
            raise ValueError(f"units of {self.staging} end at input {expected} of {self.units[-1].inputs}")
        if missing:
            raise StoreError(
                f"units {missing} of {self.store.uri(self.staging)} are not staged; run them first "
                "(a failed ingest_unit task must succeed before commit)"
            )

    def _parts(self, unit: Unit) -> list[str]:
        return [candidates_key(unit.prefix, i) for i in range(int(self.infos[unit.index]["candidate_parts"]))]

    # -- pass 1: decisions --------------------------------------------------------

    def decide(self) -> list[_UnitDecisions]:
        """Exact and near duplicates across units, in input order."""
        first: dict[bytes, int] = {}
        k = self.ds.near_duplicate_distance
        near = NearDuplicateIndex(k) if k >= 0 else None
        decisions = []
        for unit in self.units:
            quar = _read_table(self.store, f"{unit.prefix}/quarantine.parquet", [INDEX, "reason", DUP_OF])
            local = [
                (qpos, index, sha)
                for qpos, (index, reason, sha) in enumerate(
                    zip(*(quar.column(c).to_pylist() for c in (INDEX, "reason", DUP_OF)), strict=True)
                )
                if reason == "duplicate_image" and sha
            ]
            d = _UnitDecisions()
            li = pos = 0
            for part in self._parts(unit):
                cands = _read_table(self.store, part, [INDEX, "sha256", "dhash"])
                for index, sha, dhash_hex in zip(
                    *(cands.column(c).to_pylist() for c in (INDEX, "sha256", "dhash")), strict=True
                ):
                    while li < len(local) and local[li][1] < index:  # earlier local duplicates first
                        d.local_dups[local[li][0]] = first[_sha_key(local[li][2])]
                        li += 1
                    key = _sha_key(sha)
                    if key in first:
                        d.dropped[pos] = _Drop("duplicate_image", first[key])
                    else:
                        first[key] = index
                        match = near.find(int(dhash_hex, 16)) if near is not None else None
                        if match is not None:
                            d.dropped[pos] = _Drop("near_duplicate", int(match[0]), match[1])
                        elif near is not None:
                            near.add(int(dhash_hex, 16), str(index))
                    pos += 1
            for qpos, _, sha in local[li:]:
                d.local_dups[qpos] = first[_sha_key(sha)]
            decisions.append(d)
        return decisions

    # -- pass 2: tables, shard plan, version id -----------------------------------------

    def _manifest_schema(self) -> Any:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        meta: dict[str, list[Any]] = {}
        for unit in self.units:
            for part in self._parts(unit):
                for f in pq.read_schema(io.BytesIO(self.store.get_bytes(part))):
                    if f.name.startswith("meta_"):
                        meta.setdefault(f.name, []).append(f.type)
        fields = [pa.field(c, pa.type_for_alias(t)) for c, t in MANIFEST_TYPES.items()]
        for name in sorted(meta):
            types = [t for t in meta[name] if not pa.types.is_null(t)] or [pa.null()]
            try:
                unified = pa.unify_schemas(
                    [pa.schema([(name, t)]) for t in types], promote_options="permissive"
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(
                    f"metadata column {name[5:]!r} has types {sorted({str(t) for t in types})} in different "
                    f"parts of the source; give it one type ({err})"
                ) from None
            fields.append(unified.field(name))
        return pa.schema(fields)

    def tables(
        self, decisions: list[_UnitDecisions], manifest_path: Path, quarantine_path: Path
    ) -> dict[str, Any]:
        """Write manifest and quarantine parquet files, a part at a time; returns counts,
        shard plans and the hashes of the rows in input order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = schema = self._manifest_schema()
        q_schema = pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
        self.names: dict[int, str] = {}  # input index -> source, for first holders named in details
        self.needed = {d.of for ud in decisions for d in ud.dropped.values()}
        self.needed |= {i for ud in decisions for i in ud.local_dups.values()}
        self.manifest_hash, self.quarantine_hash = hashlib.sha256(), hashlib.sha256()
        self.reasons: Counter[str] = Counter()
        self.splits: Counter[str] = Counter()
        self.accepted = self.quarantined = 0
        plans: list[_ShardPlan] = []
        with pq.ParquetWriter(manifest_path, schema) as mw, pq.ParquetWriter(quarantine_path, q_schema) as qw:
            self._mw, self._qw, self._q_schema = mw, qw, q_schema
            for unit, ud in zip(self.units, decisions, strict=True):
                plans.extend(self._unit_tables(unit, ud, len(plans)))
        return {
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "reasons": dict(sorted(self.reasons.items())),
            "splits": dict(sorted(self.splits.items())),
            "plans": plans,
            "manifest_sha256": self.manifest_hash.hexdigest(),
            "quarantine_sha256": self.quarantine_hash.hexdigest(),
        }

    def _unit_tables(self, unit: Unit, ud: _UnitDecisions, numbered: int) -> list[_ShardPlan]:
        """One unit's rows in input order: hashed and written; returns its final shards (its
        staged shards that keep a sample, filtered where one was dropped, then shards of held
        samples accepted after all)."""
        quar = _read_table(self.store, f"{unit.prefix}/quarantine.parquet").to_pylist()
        k = self.ds.near_duplicate_distance
        plans: list[_ShardPlan] = []
        by_staged: dict[str, _ShardPlan] = {}
        staged_counts: Counter[str] = Counter()
        held: list[dict[str, Any]] = []
        qi = pos = 0

        def quarantine_row(qrow: dict[str, Any]) -> dict[str, Any]:
            detail = qrow["detail"]
            if qi in ud.local_dups:
                detail = f"{qrow['source']} has the same bytes as {self.names[ud.local_dups[qi]]}"
            return {"source": qrow["source"], "reason": qrow["reason"], "detail": detail}

        for part in self._parts(unit):
            kept: list[dict[str, Any]] = []
            out_q: list[dict[str, Any]] = []
            for row in _read_table(self.store, part).to_pylist():
                while qi < len(quar) and quar[qi][INDEX] < row[INDEX]:
                    out_q.append(quarantine_row(quar[qi]))
                    qi += 1
                index, source = row[INDEX], row["source"]
                if index in self.needed:
                    self.names[index] = source
                if not row[HELD]:
                    staged_counts[row[STAGED]] += 1
                drop = ud.dropped.get(pos)
                pos += 1
                if drop is None:
                    kept.append(row)
                elif drop.reason == "duplicate_image":
                    detail = f"{source} has the same bytes as {self.names[drop.of]}"
                    out_q.append({"source": source, "reason": drop.reason, "detail": detail})
                else:
                    detail = (
                        f"{source} looks like {self.names[drop.of]} ({drop.distance} of 192 hash bits "
                        f"differ; dataset.near_duplicate_distance={k})"
                    )
                    out_q.append({"source": source, "reason": drop.reason, "detail": detail})
            self._write_quarantine(out_q)
            # Through the merged schema first: a value hashes the same whichever unit held it.
            cast = self._cast(kept)
            regular = []
            for original, row in zip(kept, cast, strict=True):
                self.manifest_hash.update(_hash_row(row))
                self.splits[row["split"]] += 1
                if original[HELD]:
                    held.append({**row, HELD: True, STAGED: original[STAGED]})
                    continue
                plan = by_staged.get(original[STAGED])
                if plan is None:
                    staged = f"{unit.prefix}/shards/{original[STAGED]}"
                    plan = _ShardPlan(shard_name(numbered + len(plans)), staged=staged, keys=[])
                    by_staged[original[STAGED]] = plan
                    plans.append(plan)
                assert plan.keys is not None
                plan.keys.append(row["key"])
                row["shard"] = plan.final
                regular.append(row)
            self._write_manifest(regular)
        tail = []
        while qi < len(quar):
            tail.append(quarantine_row(quar[qi]))
            qi += 1
        self._write_quarantine(tail)
        for name, plan in by_staged.items():
            if plan.keys is not None and len(plan.keys) == staged_counts[name]:
                plan.keys = None  # nothing dropped: move it as it is
        size = self.ds.shard_size
        for start in range(0, len(held), size):
            plan = _ShardPlan(shard_name(numbered + len(plans)))
            for row in held[start : start + size]:
                plan.gathered.append((f"{unit.prefix}/held/{row.pop(STAGED)}", row["key"]))
                row.pop(HELD)
                row["shard"] = plan.final
            plans.append(plan)
        self._write_manifest(held)
        return plans

    def _cast(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import pyarrow as pa

        names = self.schema.names
        table = pa.Table.from_pylist([{c: r.get(c) for c in names} for r in rows], schema=self.schema)
        cast: list[dict[str, Any]] = table.to_pylist()
        return cast

    def _write_manifest(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self._mw.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self.accepted += len(rows)

    def _write_quarantine(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        for q in rows:
            self.quarantine_hash.update(json.dumps(q, sort_keys=True).encode() + b"\n")
            self.reasons[q["reason"]] += 1
        if rows:
            self._qw.write_table(pa.Table.from_pylist(rows, schema=self._q_schema))
            self.quarantined += len(rows)

    # -- pass 3: publish ----------------------------------------------------------

    def publish(self, prefix: str, plans: list[_ShardPlan]) -> None:
        for plan in plans:
            final = f"{prefix}/shards/{plan.final}"
            if plan.staged is not None and plan.keys is None:
                if self.store.exists(plan.staged):
                    self.store.move(plan.staged, final)
                elif not self.store.exists(final):  # a retried commit moved it already
                    raise StoreError(f"staged shard {self.store.uri(plan.staged)} is missing")
            elif plan.staged is not None:
                wanted = set(plan.keys or [])
                samples = [s for s in read_shard(self.store.get_bytes(plan.staged)) if s.key in wanted]
                write_samples(self.store, final, samples)
            else:
                write_samples(self.store, final, self._gather(plan.gathered))

    def _gather(self, wanted: list[tuple[str, str]]) -> list[ShardSample]:
        by_shard: dict[str, set[str]] = {}
        for shard, key in wanted:
            by_shard.setdefault(shard, set()).add(key)
        found: dict[str, ShardSample] = {}
        for shard, keys in by_shard.items():
            found.update((s.key, s) for s in read_shard(self.store.get_bytes(shard)) if s.key in keys)
        return [found[key] for _, key in wanted]


def commit_ingest(
    config: PipelineConfig,
    store: Store,
    staging: str,
    units: list[Unit],
    *,
    keep_result: bool = False,
    started: float | None = None,
) -> dict[str, Any]:
    """Merge the staged ``units`` of ``staging`` into a committed version; returns its summary.

    Idempotent: a version already committed is left as it is (``created: false``). With
    ``keep_result`` the summary stays in the staging prefix after publishing, so a retried
    commit task (whose units are gone) returns it instead of failing.
    """
    started = time.perf_counter() if started is None else started
    result_key = f"{staging}/{RESULT}"
    if store.exists(result_key):
        done: dict[str, Any] = store.get_json(result_key)
        return done
    ds = config.dataset
    merge = Commit(config, store, staging, units)
    decisions = merge.decide()
    processing = processing_settings(config)
    with tempfile.TemporaryDirectory(prefix="sd-commit-") as tmp:
        manifest_path, quarantine_path = Path(tmp) / "manifest.parquet", Path(tmp) / "quarantine.parquet"
        out = merge.tables(decisions, manifest_path, quarantine_path)
        inputs = sum(u.stop - u.start for u in merge.units)
        if out["accepted"] + out["quarantined"] != inputs:  # the contract: nothing lost silently
            raise AssertionError(
                f"{inputs} inputs but {out['accepted']} accepted + {out['quarantined']} quarantined"
            )
        version = hashlib.sha256(
            json.dumps(
                {
                    "processing": processing,
                    "manifest": out["manifest_sha256"],
                    "quarantine": out["quarantine_sha256"],
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        prefix = version_prefix(ds.name, version)
        summary: dict[str, Any] = {
            "dataset": ds.name,
            "version": version,
            "uri": store.uri(prefix),
            "store": store.root_uri,
            "inputs": inputs,
            "accepted": out["accepted"],
            "quarantined": out["quarantined"],
            "quarantine_reasons": out["reasons"],
            "splits": out["splits"],
            "shards": len(out["plans"]),
            "units": len(merge.units),
            "source": ds.source.uri,
            "processing": processing,
        }
        created = not store.is_committed(prefix)
        if created:
            merge.publish(prefix, out["plans"])
            store.put_file(f"{prefix}/manifest.parquet", manifest_path)
            store.put_file(f"{prefix}/quarantine.parquet", quarantine_path)
            store.put_json(f"{prefix}/ingest.json", summary)
            store.commit(prefix, {"version": version, "accepted": out["accepted"]})
        else:
            log.info("dataset %s version %s already committed; nothing to write", ds.name, version)
    summary["created"] = created
    if keep_result:
        store.put_json(result_key, summary)
        store.delete_prefix(f"{staging}/units")
    else:
        store.delete_prefix(staging)
    seconds = time.perf_counter() - started
    log.info(
        "ingested %s/%s: %d inputs -> %d accepted, %d quarantined, %d shards, %d units in %.1fs (%.0f img/s)",
        ds.name,
        version,
        inputs,
        out["accepted"],
        out["quarantined"],
        summary["shards"],
        summary["units"],
        seconds,
        inputs / max(seconds, 1e-9),
    )
    return summary


__all__ = ["MANIFEST_COLUMNS", "commit_ingest", "processing_settings"]
