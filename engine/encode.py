"""Batch encoding of image files: decoding (worker processes or a thread) overlaps with the model's encoding."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.hashers import FeatureHasher
from training.images import BadImage, load_image
from training.model import HashingNet


@dataclass
class EncodedBatch:
    positions: list[int]  # positions in the input file list of the images that decoded
    codes: np.ndarray
    features: np.ndarray
    failures: list[tuple[int, str]]  # (position, reason) of files that did not decode


class _Files(Dataset):
    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return position, load_image(self.files[position], self.size), None
        except BadImage as error:
            return position, None, str(error)
        except OSError as error:  # permissions, vanished files
            return position, None, f"{type(error).__name__}: {error}"


def _collate(items: list) -> list:
    """Keep a batch as a list: failed images (None) cannot be stacked."""
    return items


@dataclass
class Encoder:
    """Images -> (codes, features): the model's latent-layer codes, or a code maker's codes of the model's
    features when the catalog was built with `--codes lsh|itq|itq-cca|ksh`."""

    model: HashingNet
    hasher: FeatureHasher | None = None

    @property
    def input_size(self) -> int:
        return self.model.config.input_size

    @property
    def bits(self) -> int:
        return self.hasher.bits if self.hasher is not None else self.model.config.bits

    @property
    def code_bytes(self) -> int:
        return (self.bits + 7) // 8

    @property
    def feature_dim(self) -> int:
        return self.model.config.feature_dim

    @property
    def codes(self) -> str:
        return self.hasher.method if self.hasher is not None else "latent"

    @property
    def fingerprint(self) -> str:
        """What a catalog records as the maker of its codes: the model, plus the code maker if any."""
        if self.hasher is None:
            return self.model.fingerprint
        return f"{self.model.fingerprint}+{self.hasher.method}:{self.hasher.fingerprint}"

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        codes, features = self.model.encode(images)
        return (self.hasher.encode(features) if self.hasher is not None else codes), features


def default_workers() -> int:
    """Decoding processes beside the encoder. On 2 cores none: decoding in one thread of this process is
    fastest (measured: 704 img/s decoding inline against 535 with 2 worker processes fighting the model's
    threads for the cores; see benchmarks/RESULTS.md)."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


def _decoded_batches(files: _Files, batch_size: int, workers: int) -> Iterator[list]:
    """Batches of (position, image or None, error or None): from DataLoader worker processes, or with no
    workers from one thread that decodes the next batch while the model encodes this one (Pillow and torch
    both release the GIL)."""
    if workers:
        yield from DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                              prefetch_factor=4)
        return

    def decode(start: int) -> list:
        return [files[i] for i in range(start, min(start + batch_size, len(files)))]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, 0)
        for start in range(0, len(files), batch_size):
            items = pending.result()
            if start + batch_size < len(files):
                pending = pool.submit(decode, start + batch_size)
            yield items


def encode_files(encoder: Encoder, files: Sequence[Path], batch_size: int = 256,
                 workers: int | None = None) -> Iterator[EncodedBatch]:
    """Yield encoded batches in file order; files that fail to decode are reported, never raised."""
    workers = default_workers() if workers is None else workers
    for items in _decoded_batches(_Files(files, encoder.input_size), batch_size, workers):
        good = [(position, image) for position, image, _ in items if image is not None]
        failures = [(position, error) for position, image, error in items if image is None]
        if good:
            codes, features = encoder.encode(torch.stack([image for _, image in good]))
        else:
            codes = np.empty((0, encoder.code_bytes), np.uint8)
            features = np.empty((0, encoder.feature_dim), np.float32)
        yield EncodedBatch([position for position, _ in good], codes, features, failures)
