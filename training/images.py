"""Decoding image files into the uint8 tensors the model eats, identically for training, indexing and queries.

Memory is bounded because anyone may send an upload: a 343 KB PNG can hold 9400x9400 RGBA pixels. A JPEG decodes
at a reduced scale (Pillow's draft), an image over `max_pixels` decoded pixels is refused before decoding, an image
many times the model's input is reduced in strips right after decoding (never converted whole), and the pixels
being decoded in one process at once are bounded (`DECODING`).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# The decoders a photo may reach, whatever its name says (JPEG's opens a camera's multi-picture MPO too). Uploads
# and fetched URLs are strangers' bytes: Pillow's other readers (PSD, EPS through Ghostscript, FITS, ...) never
# see them.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
READABLE_FORMATS = "JPEG, PNG, WebP, BMP, TIFF or GIF"
MAX_PIXELS = 50_000_000  # default limit on decoded pixels (a JPEG counts at its reduced scale): ~200 MB decoded
REDUCING_GAP = 3  # an image this many times the input, or more, is box-reduced first (Pillow: as good as direct)
STRIP_PIXELS = 1 << 20  # pixels converted at a time while reducing a large image
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that shows the image upright
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations whose upright image is the stored one turned a quarter


class BadImage(Exception):
    """A file that cannot be used as an image (empty, truncated, not an image, too large, unreadable)."""


class BadCrop(BadImage):
    """A crop box that is empty or reaches outside the image."""


@dataclass(frozen=True)
class CropBox:
    """A region of an image, in pixels of the upright image (EXIF orientation applied, as a browser shows it)."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> "CropBox":
        """`x,y,w,h` (ValueError, worded, for anything else: four integers, x and y >= 0, w and h >= 1)."""
        parts = text.split(",")
        try:
            x, y, width, height = (int(part) for part in parts)
        except ValueError:
            raise ValueError(f"crop must be x,y,w,h (four integers), not {text!r}") from None
        if x < 0 or y < 0 or width < 1 or height < 1:
            raise ValueError(f"crop {text}: x and y must be >= 0, w and h >= 1")
        return cls(x, y, width, height)

    def check_inside(self, width: int, height: int) -> None:
        if self.x + self.width > width or self.y + self.height > height:
            raise BadCrop(f"crop {self.x},{self.y},{self.width},{self.height} reaches outside the "
                          f"{width}x{height} image")


class PixelBudget:
    """A semaphore counted in pixels: the decodes in flight hold at most `total` pixels together, so concurrent
    requests cannot add up to more than one limit's worth of memory (a larger image decodes alone)."""

    def __init__(self, total: int):
        self.total = total
        self._held = 0
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def taking(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)
        with self._condition:
            self._condition.wait_for(lambda: self._held + pixels <= self.total)
            self._held += pixels
        try:
            yield
        finally:
            with self._condition:
                self._held -= pixels
                self._condition.notify_all()


DECODING = PixelBudget(MAX_PIXELS)  # every decode of this process


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order; hidden entries skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if not f.startswith(".") and is_image_file(f))
    return found


def load_image(path: str | os.PathLike, size: int, max_pixels: int = MAX_PIXELS,
               crop: CropBox | None = None) -> torch.Tensor:
    """uint8 tensor (3, size, size): first frame, EXIF orientation applied, RGB, `crop` taken (the whole image
    without one), shorter side resized to `size` and centre-cropped. Raises BadImage for anything unusable, or over
    `max_pixels` decoded pixels; BadCrop for a box outside the image."""
    try:
        file = _open_regular_file(path)
    except OSError as error:
        raise BadImage(f"{type(error).__name__}: {error}") from error
    with file:
        return _decode(file, size, max_pixels, crop)


def load_image_bytes(data: bytes, size: int, max_pixels: int = MAX_PIXELS,
                     crop: CropBox | None = None) -> "torch.Tensor":
    """`load_image` for an image file's bytes (an upload)."""
    return _decode(io.BytesIO(data), size, max_pixels, crop)


def stack_images(images: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """Decoded images (3, S, S) as one contiguous uint8 batch, copied by numpy on this thread: torch's parallel
    copy left OpenMP threads spinning on the cores an inference runtime's threads needed (efficientnet_b0 on
    openvino-bf16, one photo, three processes: 10.2 / 10.6 / 8.4 ms after torch.stack, 8.6 / 8.5 / 4.9 after
    numpy's)."""
    import torch

    batch = np.empty((len(images), *images[0].shape), np.uint8)  # C order: np.stack alone keeps a view's
    np.stack([image.numpy() for image in images], out=batch, casting="no")
    return torch.from_numpy(batch)


def _decode(file: BinaryIO, size: int, max_pixels: int, crop: CropBox | None = None) -> "torch.Tensor":
    import torch  # here, not at the top: listing images (build-index --help) needs no torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `max_pixels` decides, below
            with contextlib.closing(Image.open(file, formats=IMAGE_FORMATS)) as image:  # closing frees the pixels
                image.seek(0)
                stored = image.size
                image.draft("RGB", _draft_request(stored, size, crop))  # JPEG: down to 1/8 scale
                decoded = image.width * image.height
                if decoded > max_pixels:
                    raise BadImage(f"{image.width}x{image.height} pixels to decode, over the limit of {max_pixels}")
                with DECODING.taking(decoded):  # a PNG's EXIF may follow its pixels: reading it decodes them
                    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                    upright = stored[::-1] if orientation in _SWAPS_SIDES else stored
                    if crop is not None:
                        crop.check_inside(*upright)
                    pixels = _model_input(image, size, orientation, upright, crop)
    except BadImage:
        raise
    except UnidentifiedImageError as error:
        raise BadImage(f"UnidentifiedImageError: not a {READABLE_FORMATS} image") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as error:
        raise BadImage(f"{type(error).__name__}: {error}") from error
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _draft_request(stored: tuple[int, int], size: int, crop: CropBox | None) -> tuple[int, int]:
    """The size to ask a JPEG's draft for: one whose scale keeps the region used (the crop, else the whole
    image) at least `size` pixels on its shorter side."""
    if crop is None:
        return size, size
    scale = size / min(crop.width, crop.height)
    return min(stored[0], math.ceil(stored[0] * scale)), min(stored[1], math.ceil(stored[1] * scale))


def _model_input(image: Image.Image, size: int, orientation: int = 1, upright: tuple[int, int] | None = None,
                 crop: CropBox | None = None) -> np.ndarray:
    """(size, size, 3) uint8 pixels of an opened image. Orientation and colour conversion commute, so an image
    that needs no reduction comes out exactly as transposed-then-converted."""
    image.load()
    upright = upright or image.size
    shrink = image.width / (upright[1] if orientation in _SWAPS_SIDES else upright[0])  # the draft's scale
    used = min(crop.width, crop.height) * shrink if crop is not None else min(image.size)
    factor = int(used // (size * REDUCING_GAP))
    rgb = _reduced_rgb(image, factor) if factor >= 2 else _to_rgb(image)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if crop is not None:  # in the upright image's pixels, scaled to what was decoded and reduced
        across, down = rgb.width / upright[0], rgb.height / upright[1]
        rgb = rgb.crop((round(crop.x * across), round(crop.y * down),
                        max(round(crop.x * across) + 1, round((crop.x + crop.width) * across)),
                        max(round(crop.y * down) + 1, round((crop.y + crop.height) * down))))
    if rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def _reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """`_to_rgb(image).reduce(factor)`, converted a strip of rows at a time: no full-size copy besides the
    decoded image itself (a whole RGBA conversion costs several)."""
    width, height = image.size
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = max(1, STRIP_PIXELS // (width * factor)) * factor
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))))
        reduced.paste(strip.reduce(factor), (0, top // factor))
    return reduced


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
