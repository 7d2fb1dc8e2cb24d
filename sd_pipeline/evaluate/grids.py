"""Picture grids: one model's samples (rows prompts, columns seeds), and two models side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

LABEL_HEIGHT = 14  # pixels of the caption strip above each half of a comparison
GUTTER = 4  # pixels between the two halves


def image_grid(rows: list[list[Image.Image]], size: int) -> Image.Image:
    """Paste ``rows`` of ``size`` x ``size`` images into one picture, row by row."""
    from PIL import Image

    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one row with one image")
    grid = Image.new("RGB", (len(rows[0]) * size, len(rows) * size))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((size, size)), (c * size, r * size))
    return grid


def side_by_side(left: Image.Image, right: Image.Image, left_label: str, right_label: str) -> Image.Image:
    """Two grids of the same prompts and seeds, left and right, each under its label.

    Size: ``(2 * grid width + GUTTER, LABEL_HEIGHT + grid height)``.
    """
    from PIL import Image, ImageDraw

    if left.size != right.size:
        raise ValueError(f"grids differ in size ({left.size} vs {right.size}); compare the same "
                         "prompts and seeds at the same resolution")
    width, height = left.size
    out = Image.new("RGB", (2 * width + GUTTER, LABEL_HEIGHT + height), (255, 255, 255))
    out.paste(left, (0, LABEL_HEIGHT))
    out.paste(right, (width + GUTTER, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), left_label, fill=(0, 0, 0))
    draw.text((width + GUTTER + 2, 1), right_label, fill=(0, 0, 0))
    return out
