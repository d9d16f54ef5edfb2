"""The images of the needle suite: a noisy background, and for a needle image one solid shape of a named colour.

Backgrounds are low-contrast noise in 14-px blocks (one vision patch each, so every patch differs and the
vision tower cannot skip them); the shape is large and saturated, so a small vision tower can learn to see it.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224  # 16 x 16 patches of 14 px -> 64 tokens after Qwen2-VL's 2 x 2 merge
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
_BLOCK = 14


def background(rng: random.Random) -> Image.Image:
    """Grey noise in 14-px blocks around a random mid-level tone (never one of the needle colours)."""
    noise = np.random.default_rng(rng.randrange(2**32))
    blocks = SIZE // _BLOCK
    tones = rng.randint(90, 160) + noise.integers(-25, 26, size=(blocks, blocks, 3))
    pixels = tones.clip(0, 255).astype(np.uint8).repeat(_BLOCK, axis=0).repeat(_BLOCK, axis=1)
    return Image.fromarray(pixels, mode="RGB")


def draw_shape(image: Image.Image, shape: str, colour: str, rng: random.Random) -> Image.Image:
    """A copy of ``image`` with one ``shape`` of ``colour``, 70-110 px wide, at a random place inside it."""
    width = rng.randint(70, 110)
    x0, y0 = rng.randint(8, SIZE - width - 8), rng.randint(8, SIZE - width - 8)
    return draw_in_box(image, shape, colour, (x0, y0, x0 + width, y0 + width))


def draw_in_box(image: Image.Image, shape: str, colour: str, box: tuple[int, int, int, int]) -> Image.Image:
    """A copy of ``image`` with ``shape`` of ``colour`` filling the square ``box`` (x0, y0, x1, y1)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return out
