"""Publishing a dataset version: staged shards, atomic visibility, kills and reruns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.staging import clear_stale_staging, staging_root
from sd_pipeline.ingest.versions import iter_samples, resolve_version, version_prefix
from sd_pipeline.storage import Store, StoreError
from sd_pipeline.synthetic import generate_shapes_dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("raw") / "shapes", count=200, size=48)


def _cfg(root: Path, raw: Path):  # type: ignore[no-untyped-def]
    return parse_config({"storage": {"root": f"file://{root}"},
                         "dataset": {"source": {"uri": f"file://{raw}"}, "shard_size": 16, "workers": 1},
                         "safety": {"classifier": None}})


def _files(root: Path, prefix: str) -> dict[str, bytes]:
    base = root / prefix
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_shards_are_staged_then_moved_and_staging_is_left_empty(tmp_path: Path, raw: Path) -> None:
    summary = ingest(_cfg(tmp_path / "a", raw))
    store = Store.from_uri(f"file://{tmp_path / 'a'}")
    assert store.list(staging_root("shapes")) == []
    shards = store.list(f"{version_prefix('shapes', summary['version'])}/shards/")
    assert len(shards) == summary["shards"] == -(-summary["accepted"] // 16)
    assert sum(1 for _ in iter_samples(store, "shapes", summary["version"])) == summary["accepted"]


def test_a_publish_cut_short_is_invisible_and_the_rerun_completes_it(tmp_path: Path, raw: Path) -> None:
    clean = ingest(_cfg(tmp_path / "clean", raw))
    prefix = version_prefix("shapes", clean["version"])
    expected = _files(tmp_path / "clean", prefix)
    # What a kill half-way through publishing leaves: some shards moved, no manifest, no
    # marker, and the killed run's staging prefix.
    broken = tmp_path / "broken"
    for name in sorted(k for k in expected if k.startswith("shards/"))[:5]:
        (broken / prefix / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / prefix / name).write_bytes(expected[name])
    stale = broken / staging_root("shapes") / f"{int(time.time()) - 3 * 86400}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "shard-000000.tar").write_bytes(b"half a shard")
    store = Store.from_uri(f"file://{broken}")
    assert not store.is_committed(prefix)
    with pytest.raises(StoreError, match="not committed"):  # what every reader asks first
        resolve_version(store, "shapes", clean["version"])
    rerun = ingest(_cfg(broken, raw))
    assert rerun["version"] == clean["version"] and rerun["created"] is True
    published = _files(broken, prefix)
    published.pop("ingest.json"), expected.pop("ingest.json")  # they name their own store
    assert published == expected  # byte for byte what a clean run publishes
    assert store.list(staging_root("shapes")) == []  # the stale staging was cleared


def test_sigkill_during_ingest_then_rerun(tmp_path: Path, raw: Path) -> None:
    """A real kill: the process dies while writing shards; the rerun publishes the version."""
    root = tmp_path / "store"
    config = tmp_path / "pipeline.yaml"
    config.write_text(_cfg(root, raw).to_json())
    exe = Path(sys.executable).with_name("sd-pipeline")
    proc = subprocess.Popen([str(exe), "ingest", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "SD_PIPELINE_HOME": str(tmp_path)})
    staging = root / staging_root("shapes")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(staging.rglob("shard-*.tar")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    versions = root / "datasets" / "shapes" / "versions"
    assert not list(versions.glob("*/_COMMITTED")), "a killed ingest must not publish a version"
    rerun = ingest(_cfg(root, raw))
    assert rerun["created"] is True
    assert (versions / rerun["version"] / "_COMMITTED").exists()
    # The killed run's staging stays (it could be a live run) until it is a day old.
    assert clear_stale_staging(Store.from_uri(f"file://{root}"), "shapes", now=time.time() + 2 * 86400) >= 0
    assert not list(staging.rglob("*.tar"))
    shutil.rmtree(root)


def test_move_works_on_s3(bucket: str) -> None:
    store = Store.from_uri(f"s3://{bucket}/p")
    store.put_bytes("staging/t/shard-000000.tar", b"bytes")
    store.move("staging/t/shard-000000.tar", "versions/v/shards/shard-000000.tar")
    assert store.get_bytes("versions/v/shards/shard-000000.tar") == b"bytes"
    assert not store.exists("staging/t/shard-000000.tar")
