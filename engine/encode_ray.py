"""Encoding on a Ray cluster: Ray Data hands batches of the file list to a pool of actors, each of which receives
the encoder once and decodes and encodes its batches; the driver commits what comes back as a local build does.

The actors read the image files themselves, so the files must be at the same path on every node (a shared
filesystem); the encoder travels through Ray's object store, so the model directory need only be on the driver.
With GPUs in the cluster each actor takes one and encodes there; otherwise each takes one CPU and encodes on one
thread (the layout that is fastest on a CPU, as in the local build's worker processes).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from engine.encode import EncodedBatch, Encoder, encode_file_batch
from shards.cluster import connect
from engine.errors import InputError


class _EncodeActor:
    """One actor of the pool: the encoder, loaded once, on this actor's device."""

    def __init__(self, encoder: Encoder, device: str):
        import torch

        torch.set_num_threads(1)
        encoder.model.to(device)
        self.encoder = encoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each input row is one batch of files (`first`: the position of its first file); every file comes back
        as a row: its code and features, or an error (codes and features then zero)."""
        parts = [self._encode(int(first), paths) for first, paths in zip(batch["first"], batch["paths"])]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _encode(self, first: int, paths: np.ndarray) -> dict[str, np.ndarray]:
        encoded = encode_file_batch(self.encoder, [Path(p) for p in paths])
        rows = len(paths)
        codes = np.zeros((rows, self.encoder.code_bytes), np.uint8)
        features = np.zeros((rows, self.encoder.feature_dim), np.float32)
        errors = np.full(rows, "", dtype=object)
        codes[encoded.positions], features[encoded.positions] = encoded.codes, encoded.features
        for row, error in encoded.failures:
            errors[row] = error
        return {"position": first + np.arange(rows), "codes": codes, "features": features,
                "error": errors.astype(str)}


def actor_count(actors: int | None) -> tuple[int, str]:
    """(actors, device) of the encoding pool: one actor per GPU of the cluster where it has GPUs, else one per
    CPU; `actors` overrides the count."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    device = "cuda" if gpus else "cpu"
    if actors is not None:
        if actors < 1:
            raise InputError(f"the Ray actor pool needs at least one actor, got {actors}")
        return actors, device
    return max(1, gpus or cpus), device


def encode_files_on_ray(encoder: Encoder, files: Sequence[Path], address: str, batch_size: int = 256,
                        actors: int | None = None) -> Iterator[EncodedBatch]:
    """`engine.encode.encode_files` on Ray at `address` (`local`, `auto` or HOST:PORT): the same encoded
    batches, positions in `files`, failures reported, never raised; batches may come in any order."""
    connect(address)
    import ray
    import ray.data  # sets up its loggers on import: quiet them after

    if not files:
        return
    count, device = actor_count(actors)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset run among our progress bar
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours run
    batches = [{"first": first, "paths": [str(f) for f in files[first:first + batch_size]]}
               for first in range(0, len(files), batch_size)]  # a row per batch: the same batches as a local build
    dataset = ray.data.from_items(batches, override_num_blocks=len(batches)).map_batches(
        _EncodeActor, fn_constructor_args=(encoder, device), batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(count, len(batches))), num_cpus=1,
        num_gpus=1 if device == "cuda" else 0)
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        failed = batch["error"] != ""
        positions = batch["position"].astype(np.int64)
        yield EncodedBatch(positions[~failed].tolist(), batch["codes"][~failed], batch["features"][~failed],
                           [(int(p), str(e)) for p, e in zip(positions[failed], batch["error"][failed])])
