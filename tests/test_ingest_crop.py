"""``dataset.crop: none``: the aspect ratio is kept, and training's buckets get the real shapes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.images import Rejection, kept_aspect_size, process_image
from sd_pipeline.ingest.versions import iter_samples, version_prefix
from sd_pipeline.storage import Store

RES = 64
CHECK = {"name": "x", "resolution": RES, "min_side": 16, "max_aspect_ratio": 4.0, "max_pixels": 10**7}
GREEN = (0, 200, 0)


def _striped(width: int, height: int) -> Image.Image:
    """Grey, with a green band along the left tenth: what a centre crop of a wide picture cuts."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste(GREEN, (0, 0, max(1, width // 10), height))
    return img


def _jpeg(img: Image.Image, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _out(data: bytes, **kw: object) -> Image.Image:
    result = process_image(data, **{**CHECK, **kw})  # type: ignore[arg-type]
    assert not isinstance(result, Rejection), result
    img = Image.open(io.BytesIO(result.jpeg))
    assert (img.width, img.height) == (result.width, result.height)
    return img


def test_kept_aspect_sizes() -> None:
    assert kept_aspect_size(300, 200, 64) == (96, 64)
    assert kept_aspect_size(200, 300, 64) == (64, 96)
    assert kept_aspect_size(250, 250, 64) == (64, 64)
    assert kept_aspect_size(1001, 333, 64) == (192, 64)  # 3.006: rounded to the pixel


def test_crop_none_keeps_the_whole_picture_at_its_shape() -> None:
    wide = _jpeg(_striped(300, 200))
    kept, square = _out(wide, crop="none"), _out(wide)
    assert kept.size == (96, 64) and square.size == (64, 64)
    green = lambda img: img.getpixel((2, img.height // 2))[1] > 150  # noqa: E731
    assert green(kept) and not green(square)  # the centre crop cut the band off
    assert _out(_jpeg(_striped(200, 300)), crop="none").size == (64, 96)
    # Smaller than the resolution: enlarged, shape kept.
    assert _out(_jpeg(_striped(48, 32)), crop="none").size == (96, 64)


def test_crop_none_applies_exif_orientation_first() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x200, shown rotated 90 degrees: upright 200x300
    result = process_image(_jpeg(_striped(300, 200), exif), **CHECK, crop="none")
    assert not isinstance(result, Rejection)
    assert (result.width, result.height) == (64, 96)
    assert (result.orig_width, result.orig_height) == (200, 300)


def test_crop_none_still_refuses_pictures_beyond_the_aspect_limit() -> None:
    result = process_image(_jpeg(_striped(500, 100)), **CHECK, crop="none")
    assert isinstance(result, Rejection) and result.reason == "bad_aspect_ratio"


def test_an_unknown_crop_names_the_field() -> None:
    with pytest.raises(ValueError, match="dataset.crop 'left'"):
        process_image(_jpeg(_striped(300, 200)), **CHECK, crop="left")
    with pytest.raises(ValueError, match="crop"):
        parse_config({"dataset": {"crop": "left"}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of wide, tall and square pictures (different enough not to be near
    duplicates of each other)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    sizes = {"wide": (480, 320), "tall": (320, 480), "square": (400, 400), "panorama": (600, 300)}
    lines = []
    for i, (name, (w, h)) in enumerate(sizes.items()):
        img = _striped(w, h)
        img.paste((40 * i, 0, 255 - 40 * i), (w // 3, h // 4, w // 2 + 20 * i, h // 2))
        img.save(root / "images" / f"{name}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"images/{name}.jpg", "text": f"a {name} picture"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _ingest(tmp_path: Path, folder: Path, **dataset: object) -> tuple[dict, pd.DataFrame, Store]:
    cfg = parse_config(
        {
            "storage": {"root": f"file://{tmp_path}/store"},
            "dataset": {
                "name": "shapes",
                "source": {"uri": f"file://{folder}"},
                "resolution": RES,
                "workers": 1,
                **dataset,
            },
            "safety": {"classifier": None},
        }
    )
    summary = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix("shapes", summary["version"])
    manifest = pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/manifest.parquet"))).to_pandas()
    return summary, manifest, store


def test_crop_none_through_ingest_feeds_non_square_buckets(tmp_path: Path, folder: Path) -> None:
    from sd_pipeline.train.buckets import make_buckets, nearest_bucket
    from sd_pipeline.train.cache import decode_to_bucket

    kept, manifest, store = _ingest(tmp_path, folder, crop="none")
    square, square_manifest, _ = _ingest(tmp_path, folder)
    assert kept["accepted"] == square["accepted"] == 4
    assert kept["version"] != square["version"]  # crop is part of the version id
    assert (square_manifest[["width", "height"]] == RES).all().all()
    columns = (manifest["source"], manifest["width"], manifest["height"])
    sizes = {Path(src).stem: (w, h) for src, w, h in zip(*columns, strict=True)}
    assert sizes == {"wide": (96, 64), "tall": (64, 96), "square": (64, 64), "panorama": (128, 64)}

    # The shards hold images of those sizes, and training's buckets take them as they are.
    buckets = make_buckets(RES, 8, 2.0)
    by_key = dict(zip(manifest["key"], manifest["source"], strict=True))
    shapes = {}
    for sample in iter_samples(store, "shapes", kept["version"]):
        name = Path(by_key[sample.key]).stem
        with Image.open(io.BytesIO(sample.image)) as img:
            assert img.size == sizes[name]
        bucket, pixels, _ = decode_to_bucket(sample.image, buckets, sample.key)
        assert pixels.shape == (3, bucket.height, bucket.width)
        shapes[name] = (bucket.width, bucket.height)
    assert shapes["square"] == (64, 64)
    assert shapes["wide"][0] > shapes["wide"][1] and shapes["tall"][1] > shapes["tall"][0]
    # 2:1 gets the most elongated bucket this small a grid has within 2.0 (80x48).
    assert shapes["panorama"] == (80, 48)
    for name, (w, h) in sizes.items():
        nearest = nearest_bucket(buckets, w, h)
        assert shapes[name] == (nearest.width, nearest.height)

    # Ingesting the same input with the same setting again gives the same version.
    again, _, _ = _ingest(tmp_path, folder, crop="none")
    assert again["version"] == kept["version"]
