"""Ingest at scale: a plan splits the inputs into units, units run apart, commit merges them.

The property that matters: however the inputs are split (one unit in one process, or many
mapped Airflow tasks), the accepted set, the quarantine and the version id are the same,
including duplicates that cross unit borders.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from airflow_stack import dags_env
from PIL import Image, ImageDraw

from sd_pipeline.config import PipelineConfig, parse_config
from sd_pipeline.ingest import units as unit_module
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.commit import commit_ingest
from sd_pipeline.ingest.images import Rejection, hamming, process_image
from sd_pipeline.ingest.shards import read_shard
from sd_pipeline.ingest.units import Unit, plan_ingest, planned_units, run_unit, split_units
from sd_pipeline.ingest.versions import iter_samples, version_prefix
from sd_pipeline.storage import Store
from sd_pipeline.synthetic import generate_shapes_dataset

REPO = Path(__file__).resolve().parent.parent
RESOLUTION = 32


def _cells(cells: list[tuple[int, int, tuple[int, int, int]]], size: int = 72) -> bytes:
    """A black PNG with coloured cells on the colour hash's 9x8 grid: each cell sets about
    one hash bit, so look-alikes at chosen distances can be built."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    w, h = size / 9, size / 8
    for row, col, colour in cells:
        draw.rectangle([col * w, row * h, (col + 1) * w - 1, (row + 1) * h - 1], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BASE = [(1, 2, (255, 0, 0)), (3, 5, (0, 255, 0)), (5, 3, (0, 0, 255)), (6, 7, (255, 0, 0))]
CHAIN_A = _cells(BASE)
CHAIN_B1 = _cells([*BASE, (0, 2, (200, 0, 0))])  # looks like A
CHAIN_B2 = _cells([*BASE, (0, 2, (200, 0, 0)), (0, 1, (0, 0, 200))])  # looks like B1, not like A


def _dhash(data: bytes) -> int:
    out = process_image(
        data, name="x", resolution=RESOLUTION, min_side=16, max_aspect_ratio=4.0, max_pixels=10**6
    )
    assert not isinstance(out, Rejection)
    return out.dhash


def make_source(root: Path) -> Path:
    """An imagefolder whose duplicates cross unit borders (units of 10 inputs):

    - ``first/x.png`` (input 1) and two byte-identical copies near the end;
    - ``first/chain-a.png`` (input 0) and, near the end, b1 (looks like a: quarantined)
      followed by b2 (looks like b1 but not like a: accepted, as in one pass);
    - the synthetic set's own near copy of image 0 and its bad inputs in between.
    """
    raw = generate_shapes_dataset(root, count=30, size=48)
    if (raw / "first").exists():
        return raw
    (raw / "first").mkdir()
    (raw / "last").mkdir()
    x = (raw / "images" / "00003.png").read_bytes()
    files = {
        "first/chain-a.png": CHAIN_A,
        "first/x.png": x,
        "last/chain-b1.png": CHAIN_B1,
        "last/x-copy1.png": x,
        "last/chain-b2.png": CHAIN_B2,
        "last/x-copy2.png": x,
    }
    for name, data in files.items():
        (raw / name).write_bytes(data)
    lines = (raw / "metadata.jsonl").read_text().splitlines()
    row = lambda name: json.dumps({"file_name": name, "text": f"planted {name}"})  # noqa: E731
    first = [row(n) for n in files if n.startswith("first/")]
    last = [row(n) for n in files if n.startswith("last/")]
    (raw / "metadata.jsonl").write_text("\n".join(first + lines + last) + "\n")
    return raw


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("raw") / "planted")


def _config(store: Path, raw: Path, **dataset: Any) -> PipelineConfig:
    return parse_config(
        {
            "storage": {"root": f"file://{store}"},
            "dataset": {
                "source": {"uri": f"file://{raw}"},
                "resolution": RESOLUTION,
                "shard_size": 4,
                "workers": 1,
                **dataset,
            },
            "safety": {"classifier": None},
        }
    )


def _tables(store_root: Path, version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    prefix = store_root / version_prefix("shapes", version)
    manifest = pq.read_table(prefix / "manifest.parquet").to_pylist()
    quarantine = pq.read_table(prefix / "quarantine.parquet").to_pylist()
    return manifest, quarantine


def _content(manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest rows without the shard they sit in (layout, not content); NaN made comparable."""
    return [
        {k: "nan" if v != v else v for k, v in r.items() if k != "shard" and v is not None} for r in manifest
    ]


def test_the_planted_look_alikes_form_a_chain() -> None:
    """The premise of the tests below, checked rather than assumed."""
    a, b1, b2 = _dhash(CHAIN_A), _dhash(CHAIN_B1), _dhash(CHAIN_B2)
    assert hamming(a, b1) <= 2 and hamming(b1, b2) <= 2 and hamming(a, b2) > 2


def test_units_tile_the_inputs() -> None:
    units = split_units("s", 25, 10)
    assert [(u.start, u.stop) for u in units] == [(0, 10), (10, 20), (20, 25)]
    assert [(u.start, u.stop) for u in split_units("s", 0, 10)] == [(0, 0)]  # an empty source is one unit
    assert Unit.from_dict(units[1].to_dict()) == units[1]


@pytest.mark.parametrize("unit_size, part_rows", [(10, 2048), (3, 2048), (100_000, 4), (10, 3)])
def test_any_split_gives_the_version_of_one_pass(
    tmp_path: Path, raw: Path, unit_size: int, part_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units of 10 or 3 inputs, and candidate tables written in parts of a few rows."""
    one = ingest(_config(tmp_path / "one", raw, unit_size=100_000))
    monkeypatch.setattr(unit_module, "PART_ROWS", part_rows)
    split = ingest(_config(tmp_path / "split", raw, unit_size=unit_size))
    assert one["units"] == 1 and split["units"] == -(-split["inputs"] // unit_size)
    assert split["version"] == one["version"]
    m1, q1 = _tables(tmp_path / "one", one["version"])
    m2, q2 = _tables(tmp_path / "split", split["version"])
    assert _content(m2) == _content(m1)
    assert q2 == q1
    assert split["accepted"] + split["quarantined"] == split["inputs"] == len(m2) + len(q2)

    reasons = {r["source"]: (r["reason"], r["detail"]) for r in q2}
    assert reasons["last/chain-b1.png"][0] == "near_duplicate"
    assert "looks like first/chain-a.png" in reasons["last/chain-b1.png"][1]
    for copy in ("last/x-copy1.png", "last/x-copy2.png"):  # both name the first holder
        assert reasons[copy] == ("duplicate_image", f"{copy} has the same bytes as first/x.png")
    assert reasons["images/bad-nearcopy.jpg"][0] == "near_duplicate"
    accepted = {r["source"] for r in m2}
    assert {"first/chain-a.png", "first/x.png", "last/chain-b2.png"} <= accepted
    # Every accepted sample is in exactly one shard, the ones put aside by a unit included.
    store = Store.from_uri(f"file://{tmp_path / 'split'}")
    keys = [s.key for s in iter_samples(store, "shapes", split["version"])]
    assert sorted(keys) == sorted(r["key"] for r in m2)
    by_key = {r["key"]: r["shard"] for r in m2}
    for shard in sorted({r["shard"] for r in m2}):
        data = store.get_bytes(f"{version_prefix('shapes', split['version'])}/shards/{shard}")
        assert all(by_key[s.key] == shard for s in read_shard(data))
    assert store.list("datasets/shapes/staging") == []


def test_a_look_alike_put_aside_by_its_unit_is_accepted_when_its_model_is_dropped(
    tmp_path: Path, raw: Path
) -> None:
    """b1 and b2 share a unit: the unit keeps b1 and holds b2 aside (it looks like b1). The
    commit drops b1 (it looks like a, from another unit), so b2 no longer looks like any
    accepted sample and is accepted, from the held shard, as one pass would decide."""
    cfg = _config(tmp_path / "store", raw, unit_size=3)
    store = Store.from_uri(cfg.storage.root)
    units = plan_ingest(cfg, store)
    for unit in units:
        run_unit(cfg, store, unit)
    held = {
        r["source"]
        for u in units
        for part in sorted((tmp_path / "store" / u.prefix).glob("candidates-*.parquet"))
        for r in pq.read_table(part).to_pylist()
        if r["_held"]
    }
    assert "last/chain-b2.png" in held
    summary = commit_ingest(cfg, store, units[0].staging, units)
    manifest, _ = _tables(tmp_path / "store", summary["version"])
    [b2] = [r for r in manifest if r["source"] == "last/chain-b2.png"]
    samples = {s.key: s for s in iter_samples(store, "shapes", summary["version"])}
    assert samples[b2["key"]].caption == "planted last/chain-b2.png"


def test_units_are_idempotent_and_commit_can_be_retried(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path / "store", raw, unit_size=10)
    store = Store.from_uri(cfg.storage.root)
    units = plan_ingest(cfg, store)
    assert planned_units(store, units[0].staging) == units
    # A unit attempt that died half-way: its leftovers are replaced by the retry.
    (tmp_path / "store" / units[1].prefix).mkdir(parents=True)
    (tmp_path / "store" / units[1].prefix / "candidates-00000.parquet").write_bytes(b"half written")
    summaries = [run_unit(cfg, store, u) for u in reversed(units)]  # any order
    marker = tmp_path / "store" / units[0].prefix / "_COMMITTED"
    before = marker.stat().st_mtime_ns
    assert run_unit(cfg, store, units[0]) == summaries[-1]  # done: not redone
    assert marker.stat().st_mtime_ns == before
    first = commit_ingest(cfg, store, units[0].staging, units, keep_result=True)
    again = commit_ingest(cfg, store, units[0].staging, units, keep_result=True)  # a retried task
    assert again == first and first["created"] is True
    assert first["version"] == ingest(_config(tmp_path / "single", raw))["version"]


def test_commit_refuses_missing_units_and_a_changed_source(tmp_path: Path, raw: Path) -> None:
    from sd_pipeline.storage import StoreError

    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    cfg = _config(tmp_path / "store", copy, unit_size=10)
    store = Store.from_uri(cfg.storage.root)
    units = plan_ingest(cfg, store)
    run_unit(cfg, store, units[0])
    with pytest.raises(StoreError, match=r"units \[1, 2, 3, 4\] .* are not staged"):
        commit_ingest(cfg, store, units[0].staging, units)
    (copy / "images" / "extra.png").write_bytes(CHAIN_A)  # the source grows after planning
    with pytest.raises(RuntimeError, match="changed since the ingest was planned"):
        run_unit(cfg, store, units[-1])


def test_a_pool_of_workers_gives_the_same_version(tmp_path: Path, raw: Path) -> None:
    one = ingest(_config(tmp_path / "a", raw, workers=1, unit_size=10))
    two = ingest(_config(tmp_path / "b", raw, workers=2, unit_size=7))
    assert one["version"] == two["version"]


# -- the mapped DAG, run by Airflow ------------------------------------------------------

ASSET_PROBE = r"""
import json
from airflow.models.asset import AssetEvent
from airflow.utils.session import create_session
with create_session() as session:
    print(json.dumps([e.extra for e in session.query(AssetEvent).all()]))
"""


@pytest.mark.slow
def test_the_mapped_dag_builds_the_version_of_one_process(tmp_path: Path, raw: Path) -> None:
    home = tmp_path / "home"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "name: scaleout\n"
        f"storage: {{root: 'file://{home}/store'}}\n"
        f"dataset: {{source: {{uri: 'file://{raw}'}}, resolution: {RESOLUTION}, shard_size: 4, "
        "unit_size: 12, workers: 2}\n"
        "quality: {min_rows: 10, max_quarantine_rate: 0.5, max_near_duplicate_rate: 0.5}\n"
        "safety: {classifier: null}\n"
    )
    env = dags_env(home, config)
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [str(airflow), "dags", "test", "sd_ingest"], env=env, capture_output=True, text=True, timeout=900
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "image workers: 2 processes" in log  # each unit used both cores

    datasets = home / "store" / "datasets" / "shapes"
    version = (datasets / "LATEST").read_text().strip()
    manifest, quarantine = _tables(home / "store", version)
    [result] = list((datasets / "staging").glob("*/result.json"))
    summary = json.loads(result.read_text())
    assert summary["version"] == version and summary["units"] == -(-summary["inputs"] // 12) >= 3
    assert (
        summary["accepted"] + summary["quarantined"] == summary["inputs"] == len(manifest) + len(quarantine)
    )
    assert {"duplicate_image", "near_duplicate"} <= {r["reason"] for r in quarantine}

    single = ingest(_config(tmp_path / "single", raw, unit_size=100_000))
    assert single["version"] == version
    m1, q1 = _tables(tmp_path / "single", single["version"])
    assert _content(m1) == _content(manifest) and q1 == quarantine

    events = subprocess.run(
        [sys.executable, "-c", ASSET_PROBE], env=env, capture_output=True, text=True, check=True
    )
    [extra] = json.loads(events.stdout.strip().splitlines()[-1])
    assert (extra["version"], extra["accepted"], extra["quarantined"]) == (
        version,
        summary["accepted"],
        summary["quarantined"],
    )
