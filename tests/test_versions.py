"""Composing dataset versions for training: latest, ids, last:N, window:Nd, and reading them.

Built on real versions: daily deliveries ingested and gated by the same stages a
scheduled sd_ingest runs, one of them rejected by its gate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sd_pipeline import stages
from sd_pipeline.config import PipelineConfig, parse_config
from sd_pipeline.ingest.versions import (
    iter_samples,
    iter_samples_many,
    parse_version_spec,
    resolve_versions,
)
from sd_pipeline.storage import Store, StoreError
from sd_pipeline.synthetic import generate_shapes_dataset

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-05"]


def _config(root: Path, raw: Path, **quality: Any) -> PipelineConfig:
    return parse_config(
        {
            "storage": {"root": f"file://{root}/store"},
            "dataset": {"source": {"uri": f"file://{raw}/{{{{ ds }}}}"}, "resolution": 32, "workers": 1},
            "quality": {"min_rows": 10, "max_quarantine_rate": 0.5, "max_drift": 10.0, **quality},
            "safety": {"classifier": None},
        }
    )


@pytest.fixture(scope="module")
def daily(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Deliveries of 11-01 .. 11-05 (no 11-04): 11-02 repeats 11-01's images plus ten new
    ones; 11-03 fails its gate; 11-05 repeats 11-02 exactly (the same version)."""
    root = tmp_path_factory.mktemp("versions")
    raw = root / "raw"
    generate_shapes_dataset(raw / DAYS[0], count=30, size=48, seed=1)
    extra = generate_shapes_dataset(root / "extra", count=10, size=48, seed=2)
    shutil.copytree(raw / DAYS[0], raw / DAYS[1])
    for i in range(10):
        shutil.copy(extra / "images" / f"{i:05d}.png", raw / DAYS[1] / "images" / f"new-{i}.png")
    with (raw / DAYS[1] / "metadata.jsonl").open("a") as fh:
        for i in range(10):
            fh.write(json.dumps({"file_name": f"images/new-{i}.png", "text": f"a new picture {i}"}) + "\n")
    generate_shapes_dataset(raw / DAYS[2], count=12, size=48, seed=3)
    shutil.copytree(raw / DAYS[1], raw / DAYS[3])
    cfg = _config(root, raw)
    versions: dict[str, str] = {}
    for day in DAYS:
        version = stages.ingest(cfg, ds=day)["version"]
        versions[day] = version
        if day == DAYS[2]:
            with pytest.raises(stages.QualityGateFailed):
                stages.validate(_config(root, raw, min_rows=1000), version, day)
        else:
            stages.validate(cfg, version, day)
    assert versions[DAYS[3]] == versions[DAYS[1]]
    return {"store": Store.from_uri(cfg.storage.root), "versions": versions, "root": root, "raw": raw}


def test_the_grammar_is_checked_before_the_store_is_read() -> None:
    assert parse_version_spec("last:3").count == 3
    assert parse_version_spec("window:7d").kind == "window"
    assert parse_version_spec("0123456789abcdef, fedcba9876543210").ids == (
        "0123456789abcdef",
        "fedcba9876543210",
    )
    for bad in ("last:0", "last:x", "window:7", "window:0d", "newest", "0123", "latest,0123456789abcdef"):
        with pytest.raises(ValueError, match="is not one of: latest"):
            parse_version_spec(bad)
    with pytest.raises(ValueError, match="names a version twice"):
        parse_version_spec("0123456789abcdef,0123456789abcdef")


def test_latest_and_explicit_ids(daily: dict[str, Any]) -> None:
    store, v = daily["store"], daily["versions"]
    assert resolve_versions(store, "shapes", "latest") == [v[DAYS[3]]]
    assert resolve_versions(store, "shapes", v[DAYS[0]]) == [v[DAYS[0]]]
    assert resolve_versions(store, "shapes", f"{v[DAYS[1]]},{v[DAYS[0]]}") == [v[DAYS[1]], v[DAYS[0]]]


def test_last_n_counts_distinct_accepted_versions_newest_first(daily: dict[str, Any]) -> None:
    store, v = daily["store"], daily["versions"]
    # 11-05 and 11-02 are the same version; 11-03 was rejected and has no day pointer.
    assert resolve_versions(store, "shapes", "last:1") == [v[DAYS[1]]]
    assert resolve_versions(store, "shapes", "last:2") == [v[DAYS[1]], v[DAYS[0]]]
    assert resolve_versions(store, "shapes", "last:50") == [v[DAYS[1]], v[DAYS[0]]]


def test_window_takes_the_days_up_to_and_including_its_end(daily: dict[str, Any]) -> None:
    store, v = daily["store"], daily["versions"]
    assert resolve_versions(store, "shapes", "window:1d") == [v[DAYS[3]]]  # ends on the newest day
    assert resolve_versions(store, "shapes", "window:3d", day="2026-11-02") == [v[DAYS[1]], v[DAYS[0]]]
    assert resolve_versions(store, "shapes", "window:1d", day="2026-11-01") == [v[DAYS[0]]]
    with pytest.raises(StoreError, match="no accepted versions in dataset.version 'window:2d'"):
        resolve_versions(store, "shapes", "window:2d", day="2026-11-04")  # 11-03 (rejected), 11-04 (none)


def test_rejected_and_unknown_versions_are_refused(daily: dict[str, Any]) -> None:
    store, v = daily["store"], daily["versions"]
    with pytest.raises(StoreError, match="failed its quality gate"):
        resolve_versions(store, "shapes", f"{v[DAYS[0]]},{v[DAYS[2]]}")
    with pytest.raises(StoreError, match="is not committed"):
        resolve_versions(store, "shapes", "0" * 16)
    with pytest.raises(StoreError, match="no dated versions"):
        resolve_versions(store, "other", "last:2")


def test_a_day_rejected_after_it_was_accepted_drops_out_of_last_n(
    tmp_path: Path, daily: dict[str, Any]
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(daily["root"] / "store", root / "store")
    store, v = Store.from_uri(f"file://{root}/store"), daily["versions"]
    # Gated again under a stricter threshold (a recorded threshold change): now rejected.
    with pytest.raises(stages.QualityGateFailed):
        stages.validate(_config(root, daily["raw"], min_rows=1000), v[DAYS[0]], DAYS[0])
    assert resolve_versions(store, "shapes", "last:5") == [v[DAYS[1]]]
    with pytest.raises(StoreError, match="failed its quality gate"):
        resolve_versions(store, "shapes", v[DAYS[0]])


def test_samples_of_several_versions_are_read_once_each(daily: dict[str, Any]) -> None:
    store, v = daily["store"], daily["versions"]
    first, second = v[DAYS[0]], v[DAYS[1]]
    one = list(iter_samples(store, "shapes", first))
    two = list(iter_samples(store, "shapes", second))
    shared = {s.meta["sha256"] for s in one} & {s.meta["sha256"] for s in two}
    assert len(shared) == len(one) > 0  # 11-02 holds all of 11-01 and more
    both = list(iter_samples_many(store, "shapes", [second, first]))
    assert [s.key for s in both] == [s.key for s in two]  # the first version gives each image
    assert len({s.meta["sha256"] for s in both}) == len(both)
    holdout = list(iter_samples_many(store, "shapes", [first, second], split="holdout"))
    assert {s.meta["split"] for s in holdout} == {"holdout"}
    assert len(holdout) == sum(1 for s in two if s.meta["split"] == "holdout")
