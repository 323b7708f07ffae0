"""Batch encoding of image files, with decoding kept off the model's critical path.

Three pipelines, picked by device and job size:
- CPU, large jobs: worker processes that each decode *and* encode whole batches on one thread (data parallel).
  On a CPU the model and Pillow compete for the same cores; one thread per process never waits at another
  thread's barrier, so this beats the model's own multi-threading on pre-decoded tensors (benchmarks/RESULTS.md).
- CUDA: worker processes decode, the GPU encodes in this process.
- Small jobs (or `workers=0`): one prefetch thread decodes the next batch while this process encodes.
"""
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


@dataclass
class DecodedBatch:
    positions: list[int]  # of the images that decoded
    images: torch.Tensor | None  # (len(positions), 3, S, S) uint8; None when none decoded
    failures: list[tuple[int, str]]


def _stack(items: list) -> DecodedBatch:
    """One tensor per batch: a worker process then hands over one shared-memory block, not one per image."""
    good = [(position, image) for position, image, _ in items if image is not None]
    return DecodedBatch([position for position, _ in good],
                        torch.stack([image for _, image in good]) if good else None,
                        [(position, error) for position, image, error in items if image is None])


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

    @property
    def device(self) -> torch.device:
        return self.model.mean.device

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        codes, features = self.model.encode(images)
        return (self.hasher.encode(features) if self.hasher is not None else codes), features


PROCESS_MIN_IMAGES = 512  # fewer images: worker processes' start-up (~0.15 s) costs more than they save


def default_workers(images: int, device: torch.device = torch.device("cpu")) -> int:
    """Worker processes for a job of `images` files: none for small jobs; on a CPU one per core (each encodes
    on one thread), beside a GPU half the cores (they only decode), at least 2."""
    if images < PROCESS_MIN_IMAGES:
        return 0
    cores = os.cpu_count() or 1
    return min(16, max(2, cores)) if device.type == "cpu" else min(8, max(2, cores // 2))


def _encode_batch(encoder: Encoder, batch: DecodedBatch) -> EncodedBatch:
    if batch.images is not None:
        codes, features = encoder.encode(batch.images)
    else:
        codes = np.empty((0, encoder.code_bytes), np.uint8)
        features = np.empty((0, encoder.feature_dim), np.float32)
    return EncodedBatch(batch.positions, codes, features, batch.failures)


class _EncodedBatches(Dataset):
    """Item i = batch i of the files, decoded and encoded inside a DataLoader worker (torch gives each worker
    one thread; the forked worker shares the model's weights with this process)."""

    def __init__(self, encoder: Encoder, files: _Files, batch_size: int):
        self.encoder, self.files, self.batch_size = encoder, files, batch_size

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __getitem__(self, index: int) -> EncodedBatch:
        start = index * self.batch_size
        decoded = _stack([self.files[i] for i in range(start, min(start + self.batch_size, len(self.files)))])
        with torch.inference_mode():
            return _encode_batch(self.encoder, decoded)


def _prefetched(files: _Files, batch_size: int) -> Iterator[DecodedBatch]:
    """Decoded batches from one thread that decodes the next batch while the caller encodes this one (Pillow
    and torch both release the GIL)."""
    def decode(start: int) -> DecodedBatch:
        return _stack([files[i] for i in range(start, min(start + batch_size, len(files)))])

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, 0)
        for start in range(0, len(files), batch_size):
            batch = pending.result()
            if start + batch_size < len(files):
                pending = pool.submit(decode, start + batch_size)
            yield batch


def encode_files(encoder: Encoder, files: Sequence[Path], batch_size: int = 256,
                 workers: int | None = None) -> Iterator[EncodedBatch]:
    """Yield encoded batches in file order; files that fail to decode are reported, never raised."""
    workers = default_workers(len(files), encoder.device) if workers is None else workers
    decoder = _Files(files, encoder.input_size)
    if workers and encoder.device.type == "cpu":
        yield from DataLoader(_EncodedBatches(encoder, decoder, batch_size), batch_size=None, num_workers=workers,
                              prefetch_factor=2)
    elif workers:
        for batch in DataLoader(decoder, batch_size=batch_size, num_workers=workers, collate_fn=_stack,
                                prefetch_factor=4):
            yield _encode_batch(encoder, batch)
    else:
        for batch in _prefetched(decoder, batch_size):
            yield _encode_batch(encoder, batch)
