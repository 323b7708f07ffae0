"""Concurrent photo searches encoded as batches: on a CPU a batch of photos takes less CPU per photo than single
encodes (224-px efficientnet_b0 in process, 8 concurrent searches: 1.3-1.6x less; benchmarks/serve_load.py
--batching measures the service), so a busy service answers more searches per second.

Each request decodes its own photo on its own worker thread (decoding stays parallel, and a bad photo fails only
its request), then hands the pixels to the batching threads. A free one encodes everything waiting once the
first photo has waited `window_ms`, at once when `max_batch` photos wait, and at once when no other photo is
still being decoded (nothing more can join soon). A photo alone (nothing encoding, waiting or decoding) is
encoded at once by its own thread: one client's searches take the path they take unbatched. There are `workers`
batching threads because one model call runs on about one core: a single batching thread left the second core
idle and lost to concurrent single calls.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine.errors import EngineError, InputError
from engine.search import UNUSABLE_UPLOAD, Timings, decode_or_refuse
from training.images import CropBox, load_image_bytes, stack_images

EncodeBatch = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]  # uint8 (N, 3, S, S) -> codes, features


@dataclass(frozen=True)
class BatchSettings:
    """How long the first photo of a batch may wait for others, the most photos one batch encodes, and the
    threads that encode batches, one batch each at a time (`engine.serve` holds the defaults: --batch-window-ms,
    --max-batch, --batch-workers)."""

    window_ms: float
    max_batch: int
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.window_ms >= 0:
            raise InputError(f"window_ms must be >= 0, not {self.window_ms}")
        if self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, not {self.max_batch}")
        if self.workers < 1:
            raise InputError(f"workers must be >= 1, not {self.workers}")


@dataclass
class _Waiting:
    """One decoded photo to encode, and what it gets back."""

    pixels: torch.Tensor
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    codes: np.ndarray | None = None
    features: np.ndarray | None = None
    error: BaseException | None = None


def decode_upload(data: bytes, size: int, max_pixels: int, crop: CropBox | None) -> torch.Tensor:
    """uint8 (3, size, size) pixels of an uploaded photo; the caller's errors for what it cannot use
    (BadCropBox for a crop outside it, InputError otherwise), as `Searcher.encode_bytes` words them."""
    return decode_or_refuse(lambda: load_image_bytes(data, size, max_pixels, crop), UNUSABLE_UPLOAD)


class EncodeBatcher:
    """The threads that call the model for photo searches, each a batch of waiting photos at a time."""

    def __init__(self, encode: EncodeBatch, settings: BatchSettings,
                 on_batch: Callable[[int], None] | None = None):
        """`encode`: the model's batch call; `on_batch`: told each batch's size (the service's metric)."""
        self._encode, self.settings, self._on_batch = encode, settings, on_batch
        self._waiting: deque[_Waiting] = deque()
        self._decoding = 0  # requests between entering `encode` and handing over their pixels
        self._encoding = 0  # batches the model is encoding now
        self._closing = False
        self._condition = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"photo-batcher-{n}", daemon=True)
                         for n in range(settings.workers)]
        for thread in self._threads:
            thread.start()

    def encode(self, decode: Callable[[], torch.Tensor], timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """Decode on this thread, then encode: at once on this thread if the photo is alone, else in the next
        batch. (1, code bytes) codes and (1, D) features; decoding errors are this request's alone; `timings` gets
        the decode seconds and the encode seconds (waiting for the batch included: what this request spent)."""
        with self._condition:
            if self._closing:
                raise EngineError("the service is shutting down")
            self._decoding += 1
        start = time.perf_counter()
        try:
            pixels = decode()
        except BaseException:
            self._handed_over(None)
            raise
        waiting = _Waiting(pixels)
        if not self._handed_over(waiting):
            self._encode_batch([waiting])
        waiting.done.wait()
        timings.decode += waiting.arrived - start
        timings.encode += time.perf_counter() - waiting.arrived
        if waiting.error is not None:
            raise waiting.error
        return waiting.codes, waiting.features

    def close(self) -> None:
        """Encode what is waiting, then stop the threads; later calls are refused."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()

    def _handed_over(self, waiting: _Waiting | None) -> bool:
        """Whether `waiting` joined the queue; False for a photo alone, which its thread encodes itself (the
        batch it starts is counted before the lock is let go, so the next photo queues)."""
        with self._condition:
            self._decoding -= 1
            alone = waiting is not None and not (self._waiting or self._decoding or self._encoding)
            if alone:
                self._encoding += 1
            elif waiting is not None:
                self._waiting.append(waiting)
            self._condition.notify_all()
            return not alone

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self._encode_batch(batch)

    def _next_batch(self) -> list[_Waiting]:
        """The photos to encode next, once the batch is due; empty when closing with nothing left."""
        window = self.settings.window_ms / 1000
        with self._condition:
            while True:
                if self._waiting and self._due(window):
                    count = min(len(self._waiting), self.settings.max_batch)
                    self._encoding += 1
                    return [self._waiting.popleft() for _ in range(count)]
                if self._closing and not self._waiting and self._decoding == 0:
                    return []
                timeout = window - (time.perf_counter() - self._waiting[0].arrived) if self._waiting else None
                self._condition.wait(timeout)

    def _due(self, window: float) -> bool:
        """Whether the oldest photo has waited the window, the batch is full, or no other photo can join soon."""
        return (self._closing or self._decoding == 0 or len(self._waiting) >= self.settings.max_batch
                or time.perf_counter() - self._waiting[0].arrived >= window)

    def _encode_batch(self, batch: list[_Waiting]) -> None:
        """Encode a batch and hand each request its row; whatever fails is every waiting request's answer (each
        its own copy), and the batch is always counted out and its requests woken."""
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            codes, features = self._encode(stack_images([waiting.pixels for waiting in batch]))
        except Exception as error:
            for waiting in batch:
                waiting.error = RuntimeError(f"encoding a batch of photos failed: {type(error).__name__}: {error}")
                waiting.error.__cause__ = error
        else:
            for row, waiting in enumerate(batch):
                waiting.codes, waiting.features = codes[row:row + 1], features[row:row + 1]
        finally:
            with self._condition:
                self._encoding -= 1
            for waiting in batch:
                waiting.done.set()
