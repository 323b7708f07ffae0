"""Decoding image files into the uint8 tensors the model eats, identically for training, indexing and queries."""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit; larger images are refused, not decoded


class BadImage(Exception):
    """A file that cannot be used as an image (empty, truncated, not an image, too large, unreadable)."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order; hidden entries skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if not f.startswith(".") and is_image_file(f))
    return found


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """uint8 tensor (3, size, size): first frame, EXIF orientation applied, RGB, shorter side resized to
    `size` and centre-cropped. Raises BadImage for anything unusable."""
    try:
        file = _open_regular_file(path)
    except OSError as error:
        raise BadImage(f"{type(error).__name__}: {error}") from error
    with file:
        return _decode(file, size)


def load_image_bytes(data: bytes, size: int) -> "torch.Tensor":
    """`load_image` for an image file's bytes (an upload)."""
    return _decode(io.BytesIO(data), size)


def _decode(file: BinaryIO, size: int) -> "torch.Tensor":
    import torch  # here, not at the top: listing images (build-index --help) needs no torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImage(f"{image.width}x{image.height} pixels is over the {MAX_PIXELS} limit")
                image.seek(0)
                image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
                ImageOps.exif_transpose(image, in_place=True)
                image = _to_rgb(image)
                if image.size != (size, size):
                    image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError as error:
        raise BadImage("UnidentifiedImageError: not an image file Pillow can read") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as error:
        raise BadImage(f"{type(error).__name__}: {error}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _open_regular_file(path: str | os.PathLike):
    """A binary file object, opened without blocking (a FIFO named x.png would otherwise hang the reader forever)
    and refused unless it is a regular file."""
    file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    try:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise BadImage("not a regular file")
        os.set_blocking(file.fileno(), True)
        return file
    except BaseException:
        file.close()
        raise


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images to RGB; transparent areas become white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")
