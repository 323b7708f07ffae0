"""Whether a model's binary codes can tell images apart: distinct codes and the balance of each bit.

A model trained for too few steps gives every image the same code (the latent layer starts with every unit
on), and every search then answers Hamming distance 0 (issue 35). Training checks its validation images and
build-index the images it encoded, so a useless model is named at once rather than found out by its searches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE = 20000  # codes a check looks at: enough to count the classes' codes, cheap at any code length
STUCK_MIN_IMAGES = 20


@dataclass
class CodeSpread:
    images: int
    distinct: int  # distinct codes among the images
    classes: int | None  # classes among the images; None when some are unlabeled
    bits: int
    stuck_bits: int  # bits the same on every image: they tell no two images apart
    bit_ones: list[float]  # per bit, the share of images with the bit set (0.5 is the most telling)

    @property
    def collapsed(self) -> bool:
        """Fewer distinct codes than classes: some classes share one code, and search cannot tell them apart."""
        if self.classes is not None:
            return self.distinct < min(self.classes, self.images)
        return self.images > 1 and self.distinct == 1

    @property
    def mostly_stuck(self) -> bool:
        """Most bits the same on every image, among enough images (on a handful, a bit may agree by chance)."""
        return self.images >= STUCK_MIN_IMAGES and self.stuck_bits > self.bits / 2

    def describe(self) -> str:
        classes = f" of {self.classes} classes" if self.classes is not None else ""
        return (f"{self.distinct} distinct code{'s' * (self.distinct != 1)} among {self.images} images{classes}, "
                f"{self.stuck_bits} of {self.bits} bits the same on every image")


def code_spread(codes: np.ndarray, bits: int, labels: list | np.ndarray | None = None) -> CodeSpread:
    """The spread of packed codes (N, ceil(bits / 8)) uint8 (the first SAMPLE of them); `labels`: one per code,
    None (or any None in it) when the classes are unknown."""
    codes = np.asarray(codes, dtype=np.uint8)[:SAMPLE]
    ones = np.unpackbits(codes, axis=1)[:, :bits].mean(0) if len(codes) else np.zeros(bits)
    classes = None
    if labels is not None and not any(label is None for label in labels[:SAMPLE]):
        classes = len(set(np.asarray(labels[:SAMPLE]).tolist()))
    return CodeSpread(images=len(codes), distinct=len(np.unique(codes, axis=0)), classes=classes, bits=bits,
                      stuck_bits=int(((ones == 0) | (ones == 1)).sum()) if len(codes) else 0,
                      bit_ones=[round(float(share), 4) for share in ones])
