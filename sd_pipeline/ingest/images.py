"""Image checks and processing: raw bytes in, a training-ready RGB JPEG or a reason out.

Checks run cheapest first and before decoding pixels where they can (size from the
header guards against decompression bombs). Output images carry no EXIF, GPS or XMP:
they are re-encoded from pixels.

Cost, per image of 512-1,500 px to 512 px (one core, Pillow 13): JPEG decode about 3.7 ms
(with DCT scaling where it helps), resize 2.6 ms with ``area`` or 8.7 ms with ``lanczos``,
JPEG q95 encode 0.9 ms, colour hash 0.5 ms. The resize filter is therefore the main lever,
and ``area`` (what img2dataset and kohya's scripts use to downscale) is the default.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"}


@dataclass(frozen=True)
class Rejection:
    reason: str  # short stable code
    detail: str  # a sentence for a person


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    format: str
    dhash: int  # colour difference hash of the upright centre crop (whole picture: crop none)


DHASH_MARGIN = 6  # of 255: above JPEG noise on flat colour, below any real edge


def dhash(img: Any, box: tuple[float, float, float, float] | None = None) -> int:
    """A 192-bit difference hash: for each of R, G, B, whether each pixel of a 9x8
    thumbnail is clearly brighter than its left neighbour. Re-encodes and resizes of a
    picture stay within a few bits; unlike a grey-level hash, a recoloured one does not.
    The margin keeps flat areas at 0 instead of flipping with compression noise.

    Ingest hashes the decoded picture over the centre-crop ``box``, before it is resized
    for training: the hash then does not depend on ``dataset.resize_filter``, and a wide
    bilinear kernel (box-reduced only down to 8x the thumbnail) averages away the grain a
    sharper or coarser path would let flip bits."""
    from PIL import Image

    rgb = img if img.mode == "RGB" else img.convert("RGB")
    px = rgb.resize((9, 8), Image.Resampling.BILINEAR, box=box, reducing_gap=8.0).tobytes()  # RGBRGB...
    h = 0
    for channel in range(3):  # bit order: channel, then row, then column (most significant first)
        for row in range(8):
            base = row * 27 + channel
            for col in range(8):
                h = (h << 1) | (px[base + 3 * col + 3] > px[base + 3 * col] + DHASH_MARGIN)
    return h


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


RESIZE_FILTERS = ("area", "bicubic", "lanczos")
CROPS = ("center", "none")  # dataset.crop
JPEG_QUALITY = 95  # 4:2:0 chroma, no optimize pass: the defaults of Pillow and OpenCV (img2dataset)


def _filter(name: str, upscale: bool) -> Any:
    """The Pillow filter for ``dataset.resize_filter``; ``area`` (box averaging, OpenCV's
    INTER_AREA) only suits shrinking, so enlarging uses Lanczos as img2dataset does."""
    from PIL import Image

    if name == "area":
        return Image.Resampling.LANCZOS if upscale else Image.Resampling.BOX
    if name == "bicubic":
        return Image.Resampling.BICUBIC
    if name == "lanczos":
        return Image.Resampling.LANCZOS
    raise ValueError(f"dataset.resize_filter {name!r} is not one of {list(RESIZE_FILTERS)}")


def process_image(
    data: bytes,
    *,
    name: str,
    resolution: int,
    min_side: int,
    max_aspect_ratio: float,
    max_pixels: int,
    resize_filter: str = "area",
    crop: str = "center",
) -> ProcessedImage | Rejection:
    """Check and normalise one image: EXIF orientation, RGB, centre-crop (``crop="center"``)
    or not (``"none"``: the aspect ratio is kept, the shorter side becomes ``resolution``),
    resize, JPEG."""
    if crop not in CROPS:
        raise ValueError(f"dataset.crop {crop!r} is not one of {list(CROPS)}")
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        return Rejection("empty_file", f"{name} is 0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejection("undecodable", f"{name} is not an image Pillow can identify")
    except Exception as err:  # noqa: BLE001 - any decoder failure is this input's fault
        return Rejection("undecodable", f"{name}: {type(err).__name__}: {err}")
    fmt = img.format or "unknown"
    if fmt not in ACCEPTED_FORMATS:
        return Rejection("unsupported_format", f"{name} is {fmt}; accepted: {sorted(ACCEPTED_FORMATS)}")
    w, h = img.size
    if w * h > max_pixels:
        return Rejection(
            "too_many_pixels",
            f"{name} is {w}x{h} = {w * h} pixels, above dataset.max_pixels={max_pixels}",
        )
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        return Rejection("animated", f"{name} has {frames} frames; only still images are used")
    if min(w, h) < min_side:
        return Rejection("too_small", f"{name} is {w}x{h}, below dataset.min_side={min_side}")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        return Rejection(
            "bad_aspect_ratio",
            f"{name} is {w}x{h} (ratio {max(w, h) / min(w, h):.2f}), above {max_aspect_ratio}",
        )
    # Upright size, from the header: EXIF orientations 5-8 swap width and height.
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as err:  # noqa: BLE001
        return Rejection("undecodable", f"{name}: truncated or corrupt ({type(err).__name__}: {err})")
    orig_w, orig_h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if fmt == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target: the DCT does
        # the downscaling for free (several times faster on large photos).
        scale = resolution / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        img.load()
        # exif_transpose copies even an upright image: call it only when it turns one.
        upright: Image.Image = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
    except Exception as err:  # noqa: BLE001
        return Rejection("undecodable", f"{name}: truncated or corrupt ({type(err).__name__}: {err})")
    rgb = _to_rgb(upright)
    cw, ch = rgb.size
    side = min(cw, ch)
    if crop == "center":
        box = ((cw - side) / 2, (ch - side) / 2, (cw + side) / 2, (ch + side) / 2)
        size = (resolution, resolution)
    else:  # the whole picture; max_aspect_ratio (checked above) bounds the longer side
        box = (0.0, 0.0, float(cw), float(ch))
        size = kept_aspect_size(cw, ch, resolution)
    resized = rgb.resize(size, _filter(resize_filter, side < resolution), box=box, reducing_gap=3.0)
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=JPEG_QUALITY)  # re-encoded from pixels: no EXIF/XMP survives
    return ProcessedImage(out.getvalue(), size[0], size[1], orig_w, orig_h, fmt, dhash(rgb, box))


def kept_aspect_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``resolution`` and the aspect ratio kept (the
    longer side rounded to the nearest pixel)."""
    if width <= height:
        return resolution, max(resolution, round(height * resolution / width))
    return max(resolution, round(width * resolution / height)), resolution


def _to_rgb(img):  # type: ignore[no-untyped-def]
    """Any mode to RGB; transparency is composited on white, not dropped to black."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        arr = (arr / max(float(arr.max()), 1.0) * 255.0).clip(0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, 1, F ...
