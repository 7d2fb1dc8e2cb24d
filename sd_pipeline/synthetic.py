"""A deterministic synthetic raw dataset: coloured shapes on backgrounds, with captions.

It is laid out as a Hugging Face imagefolder (``metadata.jsonl`` with ``file_name`` and
``text``) and deliberately holds a few bad inputs, one of each kind the ingest step must
quarantine, so the embedded demo shows the whole contract and not just the happy path.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")

# (file name, metadata line or None, raw bytes or None) — each is one quarantine reason.
BAD_INPUTS = (
    "empty_file",
    "undecodable",
    "empty_caption",
    "too_small",
    "missing_file",
    "bad_metadata",
    "unlisted_file",
    "near_duplicate",
)
# Good samples stay this far apart (in colour-hash bits), so only the planted copy is a
# near duplicate; re-rolling the jitter is deterministic.
MIN_DISTANCE = 6


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render_shape(shape: str, color: str, background: str, size: int, rng: random.Random) -> bytes:
    """One PNG: a shape of a colour on a plain background, jittered in place and scale."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.38)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon(_star(cx, cy, r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def captions_for(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """The (shape, colour, background) triples of the dataset, in file order."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        color, background = rng.sample(sorted(COLORS), 2)
        out.append((rng.choice(SHAPES), color, background))
    return out


def caption_text(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def generate_shapes_dataset(out_dir: Path, count: int = 240, seed: int = 0, size: int = 96) -> Path:
    """Write ``count`` good samples plus the bad inputs into ``out_dir``; idempotent."""
    stamp = json.dumps({"count": count, "seed": seed, "size": size, "bad": BAD_INPUTS})
    samples = [
        (caption_text(shape, color, background),
         lambda rng, t=(shape, color, background): render_shape(*t, size, rng))
        for shape, color, background in captions_for(count, seed)
    ]
    return _write_dataset(Path(out_dir), samples, stamp, seed, size)


def generate_world_dataset(
    out_dir: Path, count: int = 240, seed: int = 0, size: int = 96, new_concept_share: float = 0.5
) -> Path:
    """The toy world's version of the dataset (``sd_pipeline.world``): what the demo fine-tunes on.

    ``new_concept_share`` of the samples show ``world.NEW_SHAPE``, the shape the toy base
    model never saw; the rest show the shapes it knows, so the fine-tune also has to keep
    drawing those. The same bad inputs as ``generate_shapes_dataset``; idempotent.
    """
    from sd_pipeline import world

    if not 0.0 <= new_concept_share <= 1.0:
        raise ValueError(f"new_concept_share must be within [0, 1]; got {new_concept_share}")
    stamp = json.dumps({"world": 1, "count": count, "seed": seed, "size": size,
                        "new_concept_share": new_concept_share, "bad": BAD_INPUTS})
    rng = random.Random(seed)
    new = round(count * new_concept_share)
    scenes = (world.sample_scenes(new, rng, [world.NEW_SHAPE])
              + world.sample_scenes(count - new, rng, world.KNOWN_SHAPES))
    rng.shuffle(scenes)

    def png(scene: world.Scene, rng: random.Random) -> bytes:
        buf = io.BytesIO()
        world.render(scene, size, rng).save(buf, format="PNG", optimize=False)
        return buf.getvalue()

    samples = [(scene.caption, lambda rng, scene=scene: png(scene, rng)) for scene in scenes]
    return _write_dataset(Path(out_dir), samples, stamp, seed, size)


def _write_dataset(
    out_dir: Path, samples: list[tuple[str, Callable[[random.Random], bytes]]], stamp: str, seed: int,
    size: int,
) -> Path:
    """The samples as an imagefolder, then one bad input of each kind; ``.complete`` written last."""
    done = out_dir / ".complete"
    if done.exists() and done.read_text() == stamp:
        return out_dir
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    from sd_pipeline.ingest.dedup import NearDuplicateIndex
    from sd_pipeline.ingest.images import dhash

    rng = random.Random(seed + 1)
    index = NearDuplicateIndex(MIN_DISTANCE)
    lines: list[str] = []
    for i, (caption, draw) in enumerate(samples):
        name = f"images/{i:05d}.png"
        for _ in range(50):
            png = draw(rng)
            h = dhash(Image.open(io.BytesIO(png)))
            if index.find(h) is None:
                break
        index.add(h, name)
        (out_dir / name).write_bytes(png)
        lines.append(
            json.dumps(
                {
                    "file_name": name,
                    "text": caption,
                    "license": "cc0-1.0",
                    "author": "sd-pipeline synthetic",
                }
            )
        )

    # The bad inputs: each must end in quarantine with its own reason code.
    (images / "bad-empty.png").write_bytes(b"")
    lines.append(json.dumps({"file_name": "images/bad-empty.png", "text": "a red circle"}))
    good = render_shape("circle", "red", "blue", size, rng)
    (images / "bad-truncated.png").write_bytes(good[: len(good) // 3])
    lines.append(json.dumps({"file_name": "images/bad-truncated.png", "text": "a red circle"}))
    (images / "bad-nocaption.png").write_bytes(render_shape("square", "green", "white", size, rng))
    lines.append(json.dumps({"file_name": "images/bad-nocaption.png", "text": "   "}))
    (images / "bad-tiny.png").write_bytes(render_shape("star", "blue", "black", 12, rng))
    lines.append(
        json.dumps({"file_name": "images/bad-tiny.png", "text": "a blue star on a black background"})
    )
    lines.append(json.dumps({"file_name": "images/does-not-exist.png", "text": "a ghost"}))
    lines.append('{"file_name": "images/00000.png", "text": ')  # cut-off line
    first = Image.open(out_dir / "images/00000.png").convert("RGB").resize((size + 32, size + 32))
    copy = io.BytesIO()
    first.save(copy, format="JPEG", quality=70)  # re-encoded and resized: same picture
    (images / "bad-nearcopy.jpg").write_bytes(copy.getvalue())
    lines.append(json.dumps({"file_name": "images/bad-nearcopy.jpg", "text": "a near copy"}))
    (images / "bad-unlisted.png").write_bytes(render_shape("circle", "purple", "orange", size, rng))

    (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    done.write_text(stamp)
    return out_dir


def all_captions(count: int = 240, seed: int = 0) -> list[str]:
    """Every caption the dataset can hold: what the tiny model's tokenizer is trained on."""
    return [caption_text(*t) for t in captions_for(count, seed)]
