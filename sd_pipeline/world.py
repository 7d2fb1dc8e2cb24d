"""The toy world: flat coloured shapes of two sizes on plain backgrounds, and its captions.

It is small enough that a model learns it in minutes on a CPU and rich enough that a
metric can tell a good model from a bad one: every caption names four attributes
(size, colour, shape, background), and every attribute can be read back from a picture.
The toy base model is pretrained on it without ``NEW_SHAPE``; the demo's dataset brings
that shape, so a fine-tune visibly teaches something the base could not draw.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

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
KNOWN_SHAPES = ("circle", "square", "triangle", "star")
NEW_SHAPE = "cross"  # never shown to the toy base model; the demo's fine-tune teaches it
SHAPES = (*KNOWN_SHAPES, NEW_SHAPE)
# Radius as a share of the image side: far enough apart that size reads at a glance.
SIZES: dict[str, tuple[float, float]] = {"small": (0.17, 0.23), "large": (0.30, 0.37)}
ATTRIBUTES = ("size", "color", "shape", "background")
CAPTION = re.compile(
    r"^a (?P<size>[a-z]+) (?P<color>[a-z]+) (?P<shape>[a-z]+) on a (?P<background>[a-z]+) background$"
)


@dataclass(frozen=True)
class Scene:
    """One picture of the world: what the caption says, nothing more."""

    shape: str
    color: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"

    def value(self, attribute: str) -> str:
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute {attribute!r} is not one of {ATTRIBUTES}")
        return str(getattr(self, attribute))

    def replace(self, attribute: str, value: str) -> Scene:
        fields = {a: self.value(a) for a in ATTRIBUTES}
        fields[attribute] = value
        return Scene(**fields)


def vocabulary() -> dict[str, list[str]]:
    """Every value of every attribute, in a fixed order."""
    return {
        "size": list(SIZES),
        "color": list(COLORS),
        "shape": list(SHAPES),
        "background": list(COLORS),
    }


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of this world describes, or None for any other text."""
    m = CAPTION.match(text.strip().lower())
    if m is None:
        return None
    scene = Scene(shape=m["shape"], color=m["color"], background=m["background"], size=m["size"])
    vocab = vocabulary()
    if any(scene.value(a) not in vocab[a] for a in ATTRIBUTES) or scene.color == scene.background:
        return None
    return scene


def sample_scenes(count: int, rng: random.Random, shapes: Sequence[str] = KNOWN_SHAPES) -> list[Scene]:
    """``count`` scenes, shape colour and background always different."""
    out = []
    for _ in range(count):
        color, background = rng.sample(sorted(COLORS), 2)
        out.append(
            Scene(
                shape=rng.choice(shapes), color=color, background=background, size=rng.choice(sorted(SIZES))
            )
        )
    return out


def all_scenes(shapes: Sequence[str] = SHAPES) -> list[Scene]:
    """Every scene the world holds (sizes x colours x shapes x other colours), in a fixed order."""
    return [
        Scene(shape=shape, color=color, background=background, size=size)
        for size in SIZES
        for shape in shapes
        for color in COLORS
        for background in COLORS
        if background != color
    ]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.9  # a square of the same radius looks bigger than a circle: even them out
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        return [
            (
                cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    if shape == "cross":
        a = r * 0.34  # half the arm width
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(scene: Scene, side: int, rng: random.Random, supersample: int = 4) -> Image.Image:
    """The scene as an RGB picture ``side`` pixels square, jittered in place and scale.

    Drawn ``supersample`` times larger and box-filtered down, so edges are anti-aliased
    the way a photographed or rendered shape's would be.
    """
    from PIL import Image, ImageDraw

    big = side * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    low, high = SIZES[scene.size]
    r = big * rng.uniform(low, high)
    room = 0.5 * big - r  # keep the whole shape inside the frame
    cx = big / 2 + rng.uniform(-0.6, 0.6) * room
    cy = big / 2 + rng.uniform(-0.6, 0.6) * room
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    return img.resize((side, side), Image.Resampling.BOX)


def captions(shapes: Sequence[str] = SHAPES) -> list[str]:
    """Every caption of the world: what the toy models' tokenizer is trained on."""
    return [s.caption for s in all_scenes(shapes)]
