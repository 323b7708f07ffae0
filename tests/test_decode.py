"""Decoding at the model's size (issue 37, item 3): the pixel limit is checked from the header before any pixel
is read, whatever the format; what Pillow offers beyond JPEG's draft is measured in benchmarks/decode.py."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from engine.fetch import FetchFailed, check_image
from training.images import BadImage, load_image, load_image_bytes, stack_images


def test_a_png_over_the_limit_is_refused_before_its_pixels_are_read():
    """Reading a PNG's EXIF decodes the image when no EXIF chunk precedes its pixels: the limit comes first, so
    a PNG whose pixel data is cut short is refused for its size, not for the damage a decode would meet."""
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    cut = data[:data.index(b"IDAT") + 40]
    with pytest.raises(BadImage, match="2000x1500 pixels to decode, over the limit of 1000000"):
        load_image_bytes(cut, 32, max_pixels=1_000_000)
    with pytest.raises(BadImage, match="truncated"):
        load_image_bytes(cut, 32, max_pixels=4_000_000)
    assert load_image_bytes(data, 32, max_pixels=4_000_000).float().mean((1, 2)).round().tolist() == [10, 200, 30]


@pytest.mark.parametrize("format", ["JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"])  # MPO: a camera's JPEG
def test_the_photo_formats_decode(format):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format=format)
    assert load_image_bytes(buffer.getvalue(), 32).shape == (3, 32, 32)


@pytest.mark.parametrize("format", ["PPM", "EPS", "TGA", "PCX"])
def test_other_formats_never_reach_their_decoders(format, tmp_path):
    """Uploads and fetched URLs are strangers' bytes: only the photo formats' decoders may read them."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format=format)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == format  # Pillow itself would read it
    with pytest.raises(BadImage, match="not a JPEG, PNG, WebP, BMP, TIFF or GIF image"):
        load_image_bytes(buffer.getvalue(), 32)
    (tmp_path / "photo.jpg").write_bytes(buffer.getvalue())  # whatever its name says
    with pytest.raises(BadImage, match="not a JPEG, PNG"):
        load_image(tmp_path / "photo.jpg", 32)
    with pytest.raises(FetchFailed, match="not an image file"):
        check_image(buffer.getvalue(), "https://shop.example/photo.jpg")


def test_decoded_photos_stack_into_one_contiguous_batch():
    photos = []
    for colour in ("red", "blue"):
        file = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(file, "PNG")
        photos.append(load_image_bytes(file.getvalue(), 16))
    assert not photos[0].is_contiguous()  # a view of the decoded HWC pixels
    batch = stack_images(photos)
    assert batch.is_contiguous() and batch.dtype == torch.uint8 and torch.equal(batch, torch.stack(photos))
