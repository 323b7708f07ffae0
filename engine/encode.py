"""Batch encoding of image files, with decoding kept off the model's critical path.

Four pipelines, picked by device, inference path and job size:
- CPU, large jobs, eager: worker processes that each decode *and* encode whole batches on one thread (data
  parallel). On a CPU the model and Pillow compete for the same cores; one thread per process never waits at
  another thread's barrier, so this beats the model's own multi-threading on pre-decoded tensors
  (benchmarks/RESULTS.md).
- CPU, large jobs, a concurrent runtime (engine/inference.py; its threads must not cross a fork): the same data
  parallelism in threads of this process, one per core, each decoding a batch and then encoding it on its own
  compilation of the graph (cores / streams threads each).
- CUDA, or `workers` asked for with a runtime's path: worker processes decode, this process encodes.
- Small jobs, or a runtime that runs one call at a time: one prefetch thread decodes the next batch while this
  process encodes.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.record import EngineRecord, code_maker_file, read_record
from engine.errors import InputError
from engine.inference import Inference, prepare
from shards.codes import code_bytes
from training.hashers import CodeMaker, load_code_maker
from training.images import BadImage, load_image, stack_images
from training.model import HashingNet, load_model, pick_device


@dataclass
class EncodedBatch:
    positions: list[int]  # positions in the input file list of the images that decoded
    codes: np.ndarray
    features: np.ndarray
    failures: list[tuple[int, str]]  # (position, reason) of files that did not decode


@dataclass
class DecodedBatch:
    positions: list[int]  # of the images that decoded
    images: torch.Tensor | None  # (len(positions), 3, S, S) uint8; None when none decoded
    failures: list[tuple[int, str]]


def _decode(path: Path, size: int) -> tuple[torch.Tensor | None, str | None]:
    try:
        return load_image(path, size), None
    except BadImage as error:
        return None, str(error)
    except OSError as error:  # permissions, vanished files
        return None, f"{type(error).__name__}: {error}"


class _DecodedBatches(Dataset):
    """Item i = batch i of the files, decoded and stacked: a worker process hands over one shared-memory block
    per batch, not one per image."""

    def __init__(self, files: Sequence[Path], size: int, batch_size: int):
        self.files, self.size, self.batch_size = files, size, batch_size

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __getitem__(self, index: int) -> DecodedBatch:
        start = index * self.batch_size
        positions, images, failures = [], [], []
        for position in range(start, min(start + self.batch_size, len(self.files))):
            image, error = _decode(self.files[position], self.size)
            if image is None:
                failures.append((position, error))
            else:
                positions.append(position)
                images.append(image)
        return DecodedBatch(positions, stack_images(images) if images else None, failures)


@dataclass
class Encoder:
    """Images -> (codes, features): the model's latent-layer codes, or a code maker's codes of the model's
    features when the catalog was built with `--codes lsh|itq|itq-cca|ksh`."""

    model: HashingNet
    code_maker: CodeMaker | None = None
    inference: Inference = field(default_factory=Inference)  # how the backbone runs (engine/inference.py)

    def using(self, path: str) -> Encoder:
        """This encoder on inference path `path` (or `auto`'s measured choice; eager where it cannot run)."""
        return replace(self, inference=prepare(path, self.model, self.device.type))

    @property
    def input_size(self) -> int:
        return self.model.config.input_size

    @property
    def bits(self) -> int:
        return self.code_maker.bits if self.code_maker is not None else self.model.config.bits

    @property
    def code_bytes(self) -> int:
        return code_bytes(self.bits)

    @property
    def feature_dim(self) -> int:
        return self.model.config.feature_dim

    @property
    def codes(self) -> str:
        return self.code_maker.method if self.code_maker is not None else "latent"

    @property
    def fingerprint(self) -> str:
        """What a catalog records as the maker of its codes: the model, plus the code maker if any."""
        if self.code_maker is None:
            return self.model.fingerprint
        return f"{self.model.fingerprint}+{self.code_maker.method}:{self.code_maker.fingerprint}"

    @property
    def device(self) -> torch.device:
        return self.model.mean.device

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        codes, features = self.model.encode(images, self.inference.features)
        return (self.code_maker.encode(features) if self.code_maker is not None else codes), features

    @property
    def class_names(self) -> list[str]:
        return self.model.config.class_names

    def class_scores(self, features: np.ndarray) -> np.ndarray:
        """Class logits (N, classes) from features (N, D), float32: the network's own head (latent layer,
        sigmoid, classifier) in fp32, so a query's predicted class needs no second pass through the backbone and
        stored features (an id query) give it too."""
        latent, classifier = self.model.latent, self.model.classifier
        with torch.inference_mode():
            rows = torch.as_tensor(np.asarray(features, np.float32), device=self.device)
            hidden = torch.sigmoid(torch.nn.functional.linear(rows, latent.weight.float(), latent.bias.float()))
            return torch.nn.functional.linear(hidden, classifier.weight.float(), classifier.bias.float()).cpu().numpy()


class NoModelRecorded(InputError):
    """A catalog that records no model directory was asked to encode images, and no model directory was given."""


def load_encoder(catalog_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = "auto", record: EngineRecord | None = None,
                 inference_path: str | None = None) -> Encoder:
    """The encoder that made a catalog's codes: its recorded model (or `model_dir`), code maker and inference
    path (or `inference_path`: another path finds the same items, measured by benchmarks/photo_path.py).
    `record`: the catalog's engine.json where the caller has read it already."""
    record = record if record is not None else read_record(catalog_dir)
    model_dir = model_dir or (record.model_dir if record is not None else None)
    if model_dir is None:
        made_by = f" (its codes were made by {record.model_description()})" if record is not None else ""
        raise NoModelRecorded(f"{catalog_dir} records no model directory{made_by}, and none was given")
    encoder = Encoder(load_model(model_dir, device=pick_device(device)), recorded_code_maker(catalog_dir, record))
    return encoder.using(inference_path or (record.inference_path if record is not None else "eager"))


def recorded_code_maker(catalog_dir: str | os.PathLike, record: EngineRecord | None) -> CodeMaker | None:
    """The code maker a catalog keeps (None for the model's own latent codes)."""
    maker = code_maker_file(catalog_dir, record) if record is not None else None
    return load_code_maker(maker) if maker is not None else None


PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def _die_with_parent(parent: int, _worker: int) -> None:
    """DataLoader worker start-up: be killed when the parent dies, even by SIGKILL (which leaves it no chance to
    stop its workers), so no orphan keeps decoding, holding memory or the catalog's files."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


PROCESS_MIN_IMAGES = 512  # fewer images: worker processes' start-up (~0.15 s) costs more than they save


def default_workers(images: int, device: torch.device = torch.device("cpu"), forks: bool = True) -> int:
    """Worker processes for a job of `images` files: none for small jobs; on a CPU one per core (each encodes
    on one thread), beside a GPU half the cores (they only decode), at least 2. None either for an inference
    path that does not fork (`Inference.forks`): a concurrent runtime decodes and encodes in threads of this
    process (`default_streams`), another encodes while one prefetch thread decodes, both measured faster than
    decoding processes beside them (benchmarks/RESULTS.md, "Inference paths")."""
    if images < PROCESS_MIN_IMAGES or not forks:
        return 0
    cores = os.cpu_count() or 1
    return min(16, max(2, cores)) if device.type == "cpu" else min(8, max(2, cores // 2))


def default_streams(images: int, encoder: Encoder, batch_size: int) -> int:
    """Batches that a large CPU job on a concurrent runtime decodes and encodes at once: one per core, as many
    as 16 and no more than the job's batches (each gets the cores / streams threads); 1 for small jobs and other
    paths. efficientnet_b0 on openvino-bf16 (224 px, 1600x1200 JPEGs, 2 cores): 1.29x the img/s of one prefetch
    thread beside the runtime's two-thread calls (benchmarks/RESULTS.md, "Photo path")."""
    if images < PROCESS_MIN_IMAGES or encoder.device.type != "cpu" or not encoder.inference.concurrent:
        return 1
    return max(1, min(16, os.cpu_count() or 1, -(-images // batch_size)))


def _encode_batch(encoder: Encoder, batch: DecodedBatch) -> EncodedBatch:
    if batch.images is not None:
        codes, features = encoder.encode(batch.images)
    else:
        codes = np.empty((0, encoder.code_bytes), np.uint8)
        features = np.empty((0, encoder.feature_dim), np.float32)
    return EncodedBatch(batch.positions, codes, features, batch.failures)


class _EncodedBatches(Dataset):
    """Item i = batch i, decoded and encoded inside a DataLoader worker (torch gives each worker one thread; the
    forked worker shares the model's weights with this process)."""

    def __init__(self, encoder: Encoder, batches: _DecodedBatches):
        self.encoder, self.batches = encoder, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> EncodedBatch:
        with torch.inference_mode():
            return _encode_batch(self.encoder, self.batches[index])


def encode_file_batch(encoder: Encoder, files: Sequence[Path]) -> EncodedBatch:
    """Decode and encode one batch on this thread (positions are within `files`): what a Ray actor runs."""
    with torch.inference_mode():
        return _encode_batch(encoder, _DecodedBatches(files, encoder.input_size, max(1, len(files)))[0])


def _in_order(work: Callable[[int], T], count: int, threads: int) -> Iterator[T]:
    """work(0) ... work(count - 1) on `threads` threads of this process (Pillow, torch and the runtimes release
    the GIL), yielded in order, at most two per thread in flight: with one thread, the next runs while the caller
    uses this one. A caller that stops early waits for those running, not for those queued."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(threads) as pool:
        try:
            for index in range(count):
                pending.append(pool.submit(work, index))
                if len(pending) == 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _in_streams(encoder: Encoder, batches: _DecodedBatches, streams: int) -> Iterator[EncodedBatch]:
    """Batches decoded and encoded `streams` at a time, each on a thread of this process, in order."""
    encoder = replace(encoder, inference=encoder.inference.in_streams(streams, batches.batch_size))

    def decode_and_encode(index: int) -> EncodedBatch:
        with torch.inference_mode():  # per thread
            return _encode_batch(encoder, batches[index])

    return _in_order(decode_and_encode, len(batches), streams)


def encode_files(encoder: Encoder, files: Sequence[Path], batch_size: int = 256,
                 workers: int | None = None, streams: int | None = None) -> Iterator[EncodedBatch]:
    """Yield encoded batches in file order; files that fail to decode are reported, never raised. `workers` and
    `streams` (default: by job size, device and path; streams apply to a concurrent path only) pick the pipeline
    (the module's docstring)."""
    workers = default_workers(len(files), encoder.device, encoder.inference.forks) if workers is None else workers
    streams = default_streams(len(files), encoder, batch_size) if streams is None else streams
    batches = _DecodedBatches(files, encoder.input_size, batch_size)
    die_with_parent = functools.partial(_die_with_parent, os.getpid())
    if workers and encoder.device.type == "cpu" and encoder.inference.forks:
        yield from DataLoader(_EncodedBatches(encoder, batches), batch_size=None, num_workers=workers,
                              prefetch_factor=2, worker_init_fn=die_with_parent)
    elif workers:
        for batch in DataLoader(batches, batch_size=None, num_workers=workers, prefetch_factor=4,
                                worker_init_fn=die_with_parent):
            yield _encode_batch(encoder, batch)
    elif streams > 1 and encoder.inference.concurrent:
        yield from _in_streams(encoder, batches, streams)
    else:  # one thread decodes the next batch while this one encodes
        for batch in _in_order(batches.__getitem__, len(batches), 1):
            yield _encode_batch(encoder, batch)
