"""Ingestion: every input lands in the manifest or in quarantine, and versions are immutable."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.images import Rejection, process_image
from sd_pipeline.ingest.versions import iter_samples, resolve_version, version_prefix
from sd_pipeline.storage import Store, StoreError
from sd_pipeline.synthetic import generate_shapes_dataset


def _config(tmp_path: Path, raw: Path, root: str | None = None, **dataset: object):
    return parse_config(
        {
            "storage": {"root": root or f"file://{tmp_path}/store"},
            "dataset": {"source": {"uri": f"file://{raw}"}, "shard_size": 100, **dataset},
        }
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("raw") / "shapes", count=120)


def _parquet(store: Store, key: str):
    return pq.read_table(io.BytesIO(store.get_bytes(key))).to_pandas()


def test_every_input_is_accounted_for_with_a_reason(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    summary = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix("shapes", summary["version"])
    manifest = _parquet(store, f"{prefix}/manifest.parquet")
    quarantine = _parquet(store, f"{prefix}/quarantine.parquet")
    assert summary["inputs"] == 120 + 8 == len(manifest) + len(quarantine)
    assert dict(zip(quarantine["source"], quarantine["reason"], strict=True)) == {
        "images/bad-empty.png": "empty_file",
        "images/bad-truncated.png": "undecodable",
        "images/bad-nocaption.png": "empty_caption",
        "images/bad-tiny.png": "too_small",
        "images/does-not-exist.png": "missing_file",
        "metadata.jsonl:126": "bad_metadata",
        "images/bad-unlisted.png": "unlisted_file",
        "images/bad-nearcopy.jpg": "near_duplicate",
    }
    assert quarantine["detail"].str.len().min() > 10
    assert set(manifest["split"]) == {"train", "holdout"}
    assert manifest["sha256"].is_unique and manifest["key"].is_unique
    assert (manifest[["width", "height"]] == 64).all().all()
    assert set(manifest["shard"]) == {"shard-000000.tar", "shard-000001.tar"}
    assert store.is_committed(prefix)


def test_shards_hold_the_manifest_samples_as_clean_jpegs(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    version = ingest(cfg)["version"]
    store = Store.from_uri(cfg.storage.root)
    manifest = _parquet(store, f"{version_prefix('shapes', version)}/manifest.parquet")
    samples = list(iter_samples(store, "shapes", version))
    assert sorted(s.key for s in samples) == sorted(manifest["key"])
    by_key = manifest.set_index("key")
    for s in samples[:10]:
        img = Image.open(io.BytesIO(s.image))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
        assert not img.getexif()  # nothing of the source's metadata survives
        assert s.caption == by_key.loc[s.key, "caption"]
        assert s.meta["split"] == by_key.loc[s.key, "split"]
    holdout = list(iter_samples(store, "shapes", version, split="holdout"))
    assert len(holdout) == (manifest["split"] == "holdout").sum() > 0


def test_same_input_same_version_and_nothing_rewritten(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    first = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    marker = store.get_bytes(f"{version_prefix('shapes', first['version'])}/_COMMITTED")
    second = ingest(cfg)
    assert second["version"] == first["version"]
    assert (first["created"], second["created"]) == (True, False)
    assert store.get_bytes(f"{version_prefix('shapes', first['version'])}/_COMMITTED") == marker
    # Different processing is a different version.
    assert ingest(_config(tmp_path, raw, resolution=32))["version"] != first["version"]


def test_versions_are_not_latest_until_the_gate_accepts_them(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    version = ingest(cfg)["version"]
    store = Store.from_uri(cfg.storage.root)
    with pytest.raises(StoreError, match="no accepted version yet"):
        resolve_version(store, "shapes", "latest")
    assert resolve_version(store, "shapes", version) == version
    with pytest.raises(StoreError, match="not committed"):
        resolve_version(store, "shapes", "0" * 16)


def test_ingest_writes_to_s3(tmp_path: Path, raw: Path, bucket: str) -> None:
    cfg = _config(tmp_path, raw, root=f"s3://{bucket}/pipeline")
    summary = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    assert summary["uri"].startswith(f"s3://{bucket}/pipeline/datasets/shapes/versions/")
    assert store.is_committed(version_prefix("shapes", summary["version"]))
    assert len(list(iter_samples(store, "shapes", summary["version"]))) == summary["accepted"]


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


CHECK = {"name": "x", "resolution": 32, "min_side": 16, "max_aspect_ratio": 3.0, "max_pixels": 10_000}


def test_alpha_is_composited_on_white_not_black() -> None:
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    out = process_image(_encode(transparent, "PNG"), **CHECK)
    assert not isinstance(out, Rejection)
    assert Image.open(io.BytesIO(out.jpeg)).getpixel((16, 16))[0] > 240


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 30), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    out = process_image(_encode(img, "JPEG", exif=exif), **CHECK)
    assert not isinstance(out, Rejection)
    assert (out.orig_width, out.orig_height) == (30, 60)


@pytest.mark.parametrize(
    "img, reason",
    [
        (Image.new("RGB", (200, 200)), "too_many_pixels"),
        (Image.new("RGB", (100, 20)), "bad_aspect_ratio"),
        (Image.new("RGB", (10, 10)), "too_small"),
    ],
)
def test_image_checks_have_reason_codes(img: Image.Image, reason: str) -> None:
    out = process_image(_encode(img, "PNG"), **CHECK)
    assert isinstance(out, Rejection) and out.reason == reason


def test_cmyk_and_16_bit_become_rgb() -> None:
    for img in (Image.new("CMYK", (40, 40), (0, 255, 255, 0)), Image.new("I;16", (40, 40), 4000)):
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        out = process_image(_encode(img, fmt), **CHECK)
        assert not isinstance(out, Rejection)
        assert Image.open(io.BytesIO(out.jpeg)).mode == "RGB"


def test_ingest_summary_is_json(tmp_path: Path, raw: Path) -> None:
    summary = ingest(_config(tmp_path, raw))
    assert json.loads(json.dumps(summary)) == summary


def test_worker_pool_gives_the_same_version_as_one_process(tmp_path: Path) -> None:
    raw = generate_shapes_dataset(tmp_path / "raw", count=300, size=48)  # > one pool batch
    one = ingest(_config(tmp_path, raw, root=f"file://{tmp_path}/a", workers=1))
    two = ingest(_config(tmp_path, raw, root=f"file://{tmp_path}/b", workers=2))
    assert one["version"] == two["version"]
    assert one["accepted"] == 300


def test_near_duplicate_index_agrees_with_brute_force() -> None:
    import random

    from sd_pipeline.ingest.dedup import NearDuplicateIndex
    from sd_pipeline.ingest.images import hamming

    rng = random.Random(0)
    base = [rng.getrandbits(192) for _ in range(40)]
    # Plant neighbours at known distances from some of the base hashes.
    probes = [
        b ^ sum(1 << rng.randrange(192) for _ in range(d))
        for b, d in zip(base, [0, 1, 2, 3, 5] * 8, strict=False)
    ]
    for k in (0, 2, 4):
        index = NearDuplicateIndex(k)
        for i, h in enumerate(base):
            index.add(h, str(i))
        for p in probes:
            brute = min((hamming(p, h) for h in base), default=999)
            found = index.find(p)
            assert (found is not None) == (brute <= k)
            if found:
                assert found[1] == brute


def test_a_recoloured_picture_is_not_a_near_duplicate() -> None:
    from sd_pipeline.ingest.images import dhash, hamming

    red = Image.new("RGB", (64, 64), "white")
    blue = Image.new("RGB", (64, 64), "white")
    for img, colour in ((red, (220, 30, 30)), (blue, (30, 30, 220))):
        for x in range(16, 48):
            for y in range(16, 48):
                img.putpixel((x, y), colour)
    assert hamming(dhash(red), dhash(blue)) > 4
    kw = {**CHECK, "max_pixels": 10**6}
    a, b = process_image(_encode(red, "PNG"), **kw), process_image(_encode(blue, "PNG"), **kw)
    assert not isinstance(a, Rejection) and not isinstance(b, Rejection)
    assert hamming(a.dhash, b.dhash) > 4


def test_reencoded_copies_are_near_duplicates_whatever_the_resize_filter() -> None:
    """Resized, re-encoded copies stay within the default near_duplicate_distance (2 bits)
    for nearly all pictures (a hard edge on a thumbnail pixel can flip a few more), and the
    hash is taken before the resize: the filter does not change it."""
    import random

    from sd_pipeline.ingest.images import hamming
    from sd_pipeline.synthetic import render_shape

    rng = random.Random(0)
    kw = {**CHECK, "max_pixels": 10**6}
    distances: dict[str, list[int]] = {"area": [], "bicubic": [], "lanczos": []}
    for shape in ("circle", "square", "triangle", "star"):
        for colour, background in (
            ("red", "white"),
            ("blue", "yellow"),
            ("green", "black"),
            ("white", "purple"),
        ):
            png = render_shape(shape, colour, background, 64, rng)
            for side, quality in ((90, 60), (90, 75), (128, 60)):
                copy = _encode(Image.open(io.BytesIO(png)).resize((side, side)), "JPEG", quality=quality)
                for resize_filter, found in distances.items():
                    a = process_image(png, **kw, resize_filter=resize_filter)
                    b = process_image(copy, **kw, resize_filter=resize_filter)
                    assert not isinstance(a, Rejection) and not isinstance(b, Rejection)
                    found.append(hamming(a.dhash, b.dhash))
    assert distances["area"] == distances["bicubic"] == distances["lanczos"]
    near = sum(d <= 2 for d in distances["area"])
    assert near >= 0.8 * len(distances["area"]), distances["area"]


def test_shards_are_the_tar_files_tarfile_writes() -> None:
    """The shard writer builds USTAR headers itself for speed; the bytes must be tarfile's."""
    import tarfile

    from sd_pipeline.ingest.shards import ShardSample, read_shard, write_shard

    samples = [
        ShardSample("0123456789abcdef0123", b"\xff\xd8" * 700, "a red circle", {"split": "train"}),
        ShardSample("k" * 95, b"", "", {}),  # empty members, a long name
        ShardSample("clé-ü", b"x" * 513, "légende", {"n": 1}),  # not ASCII: tarfile's own header
    ]
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in sorted(samples, key=lambda s: s.key):
            for name, data in (
                (f"{s.key}.jpg", s.image),
                (f"{s.key}.txt", s.caption.encode()),
                (f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert write_shard(samples) == reference.getvalue()
    assert [s.key for s in read_shard(reference.getvalue())] == sorted(s.key for s in samples)
