import gzip
import pickle

import numpy as np
import pytest
from PIL import Image

from engine.synthetic import make_image_folder
from tests.conftest import SHARED_DATA
from training.data import detect_format, load_dataset
from training.errors import UserError
from training.images import BadCrop, BadImage, CropBox, load_image


def write_cifar10(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), "labels": list(range(n_train))}
        batch["labels"] = [int(x) % 10 for x in rng.integers(0, 10, n_train)]
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n_test)]}
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return test


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_cifar10_batches(tmp_path):
    test = write_cifar10(tmp_path / "cifar")
    assert detect_format(tmp_path / "cifar") == "cifar10"
    data = load_dataset(tmp_path / "cifar")
    assert data.train.images.shape == (100, 3, 32, 32) and len(data.test) == 10
    assert data.class_names[0] == "airplane"
    first = np.asarray(test["data"][0]).reshape(3, 32, 32)
    assert np.array_equal(data.test.images[0].numpy(), first)  # R plane, then G, then B, row-major


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for kind, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{kind}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{kind}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    data = load_dataset(tmp_path, format="auto")
    assert data.train.images.shape == (30, 3, 28, 28) and len(data.test) == 10
    assert not data.mirror_invariant
    assert (data.train.images[:, 0] == data.train.images[:, 2]).all()


def test_image_folder_skips_bad_files(tmp_path):
    make_image_folder(tmp_path, per_class=5, classes=("circle", "square"))
    (tmp_path / "circle" / "empty.png").write_bytes(b"")
    (tmp_path / "circle" / "text.jpg").write_text("not an image")
    good = (tmp_path / "square" / "square_00000.png").read_bytes()
    (tmp_path / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    data = load_dataset(tmp_path, val_split=0.2)
    assert len(data.train) + len(data.test) == 10
    assert len(data.skipped) == 3 and all(s["error"] for s in data.skipped)
    assert data.class_names == ["circle", "square"]


def test_image_modes_and_exif_are_normalised(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (20, 40), 128).save(tmp_path / "b.jpg")
    Image.new("CMYK", (30, 30), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("P", (30, 30)).save(tmp_path / "d.gif")
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    wide.save(tmp_path / "e.jpg", exif=exif)
    for name in "abcde":
        tensor = load_image(tmp_path / f"{name}.{ {'a': 'png', 'd': 'gif'}.get(name, 'jpg') }", 16)
        assert tensor.shape == (3, 16, 16)
    assert load_image(tmp_path / "a.png", 16).min() == 255  # transparent -> white


@pytest.mark.parametrize("suffix", ["png", "jpg"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_a_crop_box_takes_its_region_of_the_upright_image(tmp_path, suffix, orientation):
    """A red square on black, 2400x1600 (a JPEG decodes it at a reduced scale): the box around the square gives a
    red input, the whole image a mostly black one; with EXIF orientation 6 the box is in the turned image's pixels."""
    pixels = np.zeros((1600, 2400, 3), np.uint8)
    pixels[200:600, 1600:2000] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / f"scene.{suffix}", exif=exif)
    box = CropBox(1600, 200, 400, 400) if orientation == 1 else CropBox(1000, 1600, 400, 400)  # 90 degrees clockwise
    red = load_image(tmp_path / f"scene.{suffix}", 32, crop=box).float().mean((1, 2))
    assert red[0] > 240 and red[1] < 10 and red[2] < 10
    assert load_image(tmp_path / f"scene.{suffix}", 32).float().mean() < 30
    with pytest.raises(BadCrop, match="outside the"):
        load_image(tmp_path / f"scene.{suffix}", 32, crop=CropBox(2300, 0, 200, 10) if orientation == 1
                   else CropBox(1500, 0, 200, 10))


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,4,4", "1,2,3,4,5"])
def test_a_crop_box_must_be_four_integers_inside_bounds(text):
    with pytest.raises(ValueError, match="crop"):
        CropBox.parse(text)
    assert CropBox.parse("0,0,1,1") == CropBox(0, 0, 1, 1)


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("1", (12000, 8000)).save(tmp_path / "bomb.png")
    with pytest.raises(BadImage, match="limit"):
        load_image(tmp_path / "bomb.png", 32)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "class folder"),
    (lambda p: make_image_folder(p, per_class=2, classes=("circle",)), "at least two"),
])
def test_bad_data_paths(tmp_path, setup, message):
    path = tmp_path / "data"
    setup(path)
    with pytest.raises(UserError, match=message):
        load_dataset(path)


@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="shared CIFAR-10 not present")
def test_real_cifar10_order():
    data = load_dataset(SHARED_DATA / "cifar-10-batches-py")
    assert len(data.train) == 50_000 and len(data.test) == 10_000
    assert data.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="shared MNIST not present")
def test_real_mnist_order():
    data = load_dataset(SHARED_DATA / "mnist")
    assert len(data.train) == 60_000 and len(data.test) == 10_000
    assert data.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
