"""A labeled image folder drawn from scratch: ten visually distinct classes with random variation.

Used by the demo and the tests, so that neither needs a download.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker", "diagonal", "dots")


def _colour(rng: np.random.Generator, dark: bool) -> tuple[int, int, int]:
    base = rng.integers(0, 110, 3) if dark else rng.integers(140, 256, 3)
    return tuple(int(c) for c in base)


def draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `kind`: random colours (light shape on dark ground or the reverse), position, scale,
    line width, plus pixel noise."""
    dark_ground = rng.random() < 0.5
    image = Image.new("RGB", (size, size), _colour(rng, dark_ground))
    pen = _colour(rng, not dark_ground)
    d = ImageDraw.Draw(image)
    s = size
    r = s * rng.uniform(0.22, 0.36)
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12) * s, s / 2 + rng.uniform(-0.12, 0.12) * s
    width = max(1, int(s * rng.uniform(0.06, 0.11)))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=pen)
    elif kind == "square":
        d.rectangle(box, fill=pen)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=pen)
    elif kind == "cross":
        d.line([(cx - r, cy), (cx + r, cy)], fill=pen, width=width)
        d.line([(cx, cy - r), (cx, cy + r)], fill=pen, width=width)
    elif kind == "ring":
        d.ellipse(box, outline=pen, width=width)
    elif kind in ("hstripes", "vstripes"):
        period = max(3, int(s * rng.uniform(0.15, 0.25)))
        for offset in range(int(rng.integers(0, period)) - period, s, period):
            line = [(0, offset), (s, offset)] if kind == "hstripes" else [(offset, 0), (offset, s)]
            d.line(line, fill=pen, width=max(1, period // 2))
    elif kind == "checker":
        cell = max(2, int(s * rng.uniform(0.14, 0.22)))
        for y in range(0, s, cell):
            for x in range(0, s, cell):
                if (x // cell + y // cell) % 2 == 0:
                    d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=pen)
    elif kind == "diagonal":
        d.line([(0, 0), (s, s)] if rng.random() < 0.5 else [(0, s), (s, 0)], fill=pen, width=width * 2)
    elif kind == "dots":
        for _ in range(int(rng.integers(5, 9))):
            x, y, rr = rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.05, 0.09)
            d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=pen)
    else:
        raise ValueError(f"unknown class {kind}")
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (s, s, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: str | os.PathLike, per_class: int = 100, size: int = 32, seed: int = 0,
                      classes: tuple[str, ...] = CLASSES, start: int = 0) -> list[Path]:
    """Write `per_class` PNG files into `root/<class>/`; returns the paths written."""
    rng = np.random.default_rng(seed)
    written = []
    for kind in classes:
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            path = folder / f"{kind}_{i:05d}.png"
            draw(kind, size, rng).save(path)
            written.append(path)
    return written
