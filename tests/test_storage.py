"""Store round trips on file:// and on s3:// against a real S3 API server (moto, 127.0.0.1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sd_pipeline.storage import LocalStore, Store, StoreError


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return Store.from_uri(f"file://{tmp_path}/root")
    bucket = request.getfixturevalue("bucket")
    return Store.from_uri(f"s3://{bucket}/some/prefix")


def test_bytes_json_and_listing_round_trip(store: Store) -> None:
    store.put_bytes("a/b/c.bin", b"\x00\x01payload")
    store.put_json("a/meta.json", {"n": 1, "s": "x"})
    store.put_bytes("ab/other.txt", b"not under a/")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert store.get_json("a/meta.json") == {"n": 1, "s": "x"}
    assert store.list("a") == ["a/b/c.bin", "a/meta.json"]
    assert store.exists("a/meta.json") and not store.exists("a/nope")
    assert store.uri("a/meta.json").endswith("/a/meta.json")


def test_missing_key_raises_with_its_uri(store: Store) -> None:
    with pytest.raises(StoreError, match="nope/missing.bin does not exist"):
        store.get_bytes("nope/missing.bin")


def test_commit_marker_publishes_a_prefix(store: Store) -> None:
    store.put_bytes("v/1/data.bin", b"x")
    assert not store.is_committed("v/1")
    store.commit("v/1", {"rows": 1})
    assert store.is_committed("v/1")
    assert store.get_json("v/1/_COMMITTED") == {"rows": 1}


def test_pointer_and_dirs(store: Store, tmp_path: Path) -> None:
    assert store.read_pointer("LATEST") is None
    store.write_pointer("LATEST", "abc\n")
    assert store.read_pointer("LATEST") == "abc"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    assert store.upload_dir(src, "up") == ["up/sub/y.txt", "up/x.txt"]
    out = store.download_dir("up", tmp_path / "dst")
    assert (out / "sub" / "y.txt").read_text() == "y"
    assert store.delete_prefix("up") == 2
    assert store.list("up") == []


def test_local_store_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(StoreError, match="escapes the store root"):
        store.put_bytes("../evil.txt", b"x")


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(StoreError, match="unsupported store URI"):
        Store.from_uri("gs://bucket/x")


@pytest.mark.parametrize("hostile", ["up/../../escaped.txt", "up/{abs}"], ids=["dot-dot", "leading-slash"])
def test_download_dir_refuses_keys_that_leave_the_target_folder(
    bucket: str, s3_env: str, tmp_path: Path, hostile: str
) -> None:
    """An object whose key climbs out (``..``) or is absolute after the prefix is refused by name,
    and nothing of the prefix is written: neither outside the folder nor half of it inside."""
    import boto3

    outside = tmp_path / "escaped.txt"
    key = hostile.format(abs=outside)  # "up//<tmp>/escaped.txt": absolute once the prefix is cut
    client = boto3.client("s3", endpoint_url=s3_env)
    client.put_object(Bucket=bucket, Key="up/fine.txt", Body=b"fine")
    client.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    store = Store.from_uri(f"s3://{bucket}")
    target = tmp_path / "a" / "dst"
    with pytest.raises(StoreError, match=re.escape(repr(key))):
        store.download_dir("up", target)
    assert not outside.exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert not (target / "fine.txt").exists()
