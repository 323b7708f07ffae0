"""Labeled image sets held in memory as uint8 tensors: an image directory, CIFAR-10 batches, MNIST IDX.

In-memory uint8 (N, 3, S, S) keeps augmentation a handful of batched tensor ops, which on a 2-core CPU
beats any DataLoader; 50k CIFAR images take 150 MB.
"""
from __future__ import annotations

import gzip
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.config import FORMATS
from training.errors import Setting, UserError
from training.images import BadImage, list_images, load_image

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class LabeledImages:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: LabeledImages
    test: LabeledImages | None
    class_names: list[str]
    mirror_invariant: bool = True  # False where a flip changes meaning (digits)
    skipped: list[dict] = field(default_factory=list)  # {"path", "error"} of each image file that did not decode


def detect_format(path: Path) -> str:
    if (path / "data_batch_1").is_file() and (path / "test_batch").is_file():
        return "cifar10"
    if any((path / (name + suffix)).is_file() for name in MNIST_FILES["train"][:1] for suffix in ("", ".gz")):
        return "mnist"
    return "folder"


CLASS_NAMES_FILE = "classes.txt"


def load_dataset(path: str | os.PathLike, format: str = "auto", input_size: int = 32,
                 val_split: float = 0.1, seed: int = 0, class_names: list[str] | None = None) -> Dataset:
    """Load a labeled set; a folder without train/ and test/ subfolders is split by `val_split`. For CIFAR-10
    and MNIST-format data, `class_names` (or a classes.txt beside the data, one name per line) names the
    classes: an MNIST-format folder may hold Fashion-MNIST."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"data path {path} is not a directory")
    if format not in FORMATS:
        raise UserError("unknown ", Setting("format"), f" '{format}'; choose one of {', '.join(FORMATS)}")
    if not 0 <= val_split < 1:
        raise UserError(Setting("val_split"), f" must be in [0, 1), got {val_split}")
    if format == "auto":
        format = detect_format(path)
    if format == "cifar10":
        dataset = _load_cifar10(path)
    elif format == "mnist":
        dataset = _load_mnist(path)
    else:
        dataset = _load_folder(path, input_size, val_split, seed)
    names_file = path / CLASS_NAMES_FILE
    if class_names is None and names_file.is_file() and format != "folder":
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if class_names is not None:
        if format == "folder":
            raise UserError(f"{path}: class names of an image folder are its subfolder names")
        if len(class_names) != len(dataset.class_names) or len(set(class_names)) != len(class_names):
            raise UserError(f"{len(class_names)} class names given, {path} has {len(dataset.class_names)} "
                            "classes (one distinct name each)")
        dataset.class_names = list(class_names)
    if len(dataset.class_names) < 2:
        raise UserError(f"{path} has {len(dataset.class_names)} class(es); training needs at least two")
    if len(dataset.train) == 0:
        raise UserError(f"{path} holds no usable training images")
    return dataset


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are pickles of dicts, lists, bytes, str, int and numpy arrays. Anything else
    (a pickle can name any callable: os.system) is refused, so a crafted file in a data folder cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR-10 batch file")
        return super().find_class(module, name)


def _load_cifar10(path: Path) -> Dataset:
    def read(name: str) -> dict:
        with open(path / name, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        if not isinstance(batch, dict):
            raise ValueError(f"{name} holds a {type(batch).__name__}, not a dict")
        return batch

    def to_images(batches: list[dict]) -> LabeledImages:
        data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
        return LabeledImages(torch.from_numpy(data), torch.from_numpy(labels).long())

    try:
        train = to_images([read(f"data_batch_{i}") for i in range(1, 6)])
        test = to_images([read("test_batch")])
        class_names = read("batches.meta")["label_names"]
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, AttributeError) as error:
        raise UserError(f"{path} is not a readable CIFAR-10 python batches directory: {error}") from error
    return Dataset(train, test, list(class_names))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _load_mnist(path: Path) -> Dataset:
    def find(name: str) -> Path:
        for candidate in (path / name, path / (name + ".gz")):
            if candidate.is_file():
                return candidate
        raise UserError(f"MNIST directory {path} lacks {name}[.gz]")

    def split(kind: str) -> LabeledImages:
        images_file, labels_file = MNIST_FILES[kind]
        images = torch.from_numpy(_read_idx(find(images_file)).copy())
        labels = torch.from_numpy(_read_idx(find(labels_file)).astype(np.int64))
        return LabeledImages(images[:, None].expand(-1, 3, -1, -1).contiguous(), labels)  # gray -> RGB

    return Dataset(split("train"), split("test"), [str(d) for d in range(10)], mirror_invariant=False)


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _decode_folder(root: Path, class_names: list[str], input_size: int) -> tuple[LabeledImages, list[dict]]:
    files, labels = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        found = list_images(folder) if folder.is_dir() else []
        files += found
        labels += [label] * len(found)

    def decode(file: Path) -> torch.Tensor | str:
        try:
            return load_image(file, input_size)
        except BadImage as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        decoded = list(tqdm(pool.map(decode, files), total=len(files), desc=f"decoding {root.name}",
                            unit="img", leave=False))
    keep = [i for i, image in enumerate(decoded) if not isinstance(image, str)]
    skipped = [dict(path=os.fsencode(files[i]).decode("utf-8", "backslashreplace"), error=image)
               for i, image in enumerate(decoded) if isinstance(image, str)]
    if not keep:
        return LabeledImages(torch.empty(0, 3, input_size, input_size, dtype=torch.uint8),
                             torch.empty(0, dtype=torch.long)), skipped
    images = torch.stack([decoded[i] for i in keep])
    return LabeledImages(images, torch.tensor([labels[i] for i in keep], dtype=torch.long)), skipped


def _load_folder(path: Path, input_size: int, val_split: float, seed: int) -> Dataset:
    """One subfolder per class; or train/ and test/ (or val/) subfolders that each hold class folders."""
    test_root = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    train_root = path / "train" if (path / "train").is_dir() and test_root else path
    class_names = [d.name for d in _class_folders(train_root)]
    if len(class_names) < 2:
        raise UserError(f"{train_root} has {len(class_names)} class folder(s); training needs at least two "
                        "(one subfolder of images per class)")
    train, skipped = _decode_folder(train_root, class_names, input_size)
    if len(train) == 0:
        raise UserError(f"no readable images under {train_root}")
    if test_root is not None and train_root != path:
        test, test_skipped = _decode_folder(test_root, class_names, input_size)
        return Dataset(train, test, class_names, skipped=skipped + test_skipped)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(train) * val_split))
    if n_val == 0:
        return Dataset(train, None, class_names, skipped=skipped)
    val, rest = order[:n_val], order[n_val:]
    return Dataset(LabeledImages(train.images[rest], train.labels[rest]),
                   LabeledImages(train.images[val], train.labels[val]), class_names, skipped=skipped)
