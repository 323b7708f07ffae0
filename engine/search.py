"""The Python API behind `python -m engine.query`: images (or catalog ids) in, ranked catalog items out."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.encode import Encoder, load_encoder
from engine.inference import PATHS, check_path_name, runnable
from engine.record import item_id, read_record
from shards import Catalog, CatalogError, CatalogReader, Hits, StageTimings
from shards.filters import Filter, stored_label
from shards.ranking import pool_size
from engine.errors import BadCropBox, InputError
from training.images import (MAX_PIXELS, BadCrop, BadImage, CropBox, load_image, load_image_bytes,
                             stack_images)
from training.model import pick_device


@dataclass
class Result:
    rank: int
    id: int
    path: str | None
    label: str | None
    hamming: int
    distance: float | None
    metadata: dict | None = None  # product metadata (SKU, title, price, ...), where the item has any


@dataclass
class Timings(StageTimings):
    """Seconds spent per stage for the whole batch of queries: the catalog's search stages, and the images'."""

    decode: float = 0.0
    encode: float = 0.0


def unchanged_since_indexed(path: Path, meta: dict | None) -> bool:
    """Whether a file still holds what the catalog indexed under its path (same size and mtime): a stored code
    is only reused for the content it was computed from."""
    status = path.stat()
    return meta is not None and (meta.get("size"), meta.get("mtime_ns")) == (status.st_size, status.st_mtime_ns)


UNUSABLE_UPLOAD = "not a usable image"


def decode_or_refuse(load: Callable[[], torch.Tensor], problem: str) -> torch.Tensor:
    """One image's pixels from `load`; an image that does not decode is the caller's InputError, worded
    `problem: why` (BadCropBox for a crop outside it), never a decoder's exception."""
    try:
        return load()
    except BadCrop as error:
        raise BadCropBox(str(error)) from error
    except BadImage as error:
        raise InputError(f"{problem}: {error}") from error


class Searcher:
    """Two-stage search over a catalog: the model that makes query codes, and the catalog's read contract
    (`shards.reader.CatalogReader`), in this process or on Ray actors: one search path for both.

    The model (and code maker) are the ones the catalog was built with, as recorded in the catalog, unless
    `model_dir` is given.
    """

    def __init__(self, catalog_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = "auto", threads: int | None = None, ray: str | None = None,
                 shards_per_actor: int = 1, inference_path: str | None = None):
        """`threads`: Faiss threads per search (default: the catalog's choice); a server that runs searches
        concurrently uses 1 and lets the requests fill the cores. `ray`: serve the shards from Ray actors
        (`shards.cluster`) at this address (`local`, `auto` or HOST:PORT), `shards_per_actor` each; results
        equal the in-process catalog's. `inference_path`: a path of engine/inference.py to encode query images on
        (default: the catalog's; another path finds nearly the same items)."""
        if inference_path is not None:
            check_path_name(inference_path, choices=tuple(PATHS))  # a path itself: `auto` is the catalog's to pick
        self.catalog_dir = Path(catalog_dir)
        self.catalog: CatalogReader
        if ray is None:
            self.catalog = Catalog.open(self.catalog_dir, readonly=True, threads=threads)
        else:
            from shards.cluster import RayCatalog

            self.catalog = RayCatalog(self.catalog_dir, ray, shards_per_actor)
        self.record = read_record(self.catalog_dir)  # engine.json, read once: the model, code maker, image folders
        self._model_dir = model_dir
        self._inference_path = inference_path
        self._device = device
        self._encoder = None
        self._loading = threading.Lock()  # concurrent first photo searches load the model once
        self.timings = Timings()

    def refresh(self) -> None:
        """See what was committed since opening (adds and deletes by a writer); not during a search."""
        self.catalog.refresh()

    @property
    def encoder(self) -> Encoder:
        """Loaded on first use: searching by catalog id needs no model."""
        with self._loading:
            if self._encoder is None:
                encoder = load_encoder(self.catalog_dir, self._model_dir, self._device, self.record,
                                       self._inference_path)
                if encoder.fingerprint != self.catalog.manifest.model_fingerprint:
                    raise CatalogError(f"model {self._model_dir or 'recorded in the catalog'} "
                                       f"({encoder.fingerprint}) did not make the codes of {self.catalog_dir} "
                                       f"({self.catalog.manifest.model_fingerprint})")
                self._encoder = encoder
            return self._encoder

    @property
    def model_loaded(self) -> bool:
        return self._encoder is not None

    def warm_up(self) -> None:
        """Load the model and run one photo and one batch through it, so that the first searches by photo wait
        for neither (a runtime converts and compiles each graph at its first use: seconds). Nothing where the
        catalog names no model and none was given."""
        if self._model_dir is None and (self.record is None or self.record.model_dir is None):
            return
        encoder = self.encoder
        blank = torch.zeros(2, 3, encoder.input_size, encoder.input_size, dtype=torch.uint8)
        with torch.inference_mode():
            encoder.encode(blank[:1])
            encoder.encode(blank)

    @property
    def inference_path(self) -> str:
        """How queries' images are encoded (engine/inference.py): the loaded encoder's path, else the one loading
        it will take (the catalog's, or eager where that cannot run here)."""
        if self._encoder is not None:
            return self._encoder.inference.name
        chosen = self._inference_path or (self.record.inference_path if self.record is not None else "eager")
        return runnable(chosen, pick_device(self._device).type)

    def encode(self, images: Sequence[str | os.PathLike], crops: Sequence[CropBox | None] | None = None,
               timings: Timings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes and features of image files (a file already indexed is read from the catalog, not re-encoded,
        unless a region of it is asked for); `crops`: a region of each image to search with (None: all of it)."""
        paths = [Path(p).resolve() for p in images]
        crops = crops if crops is not None else [None] * len(paths)
        folders = [str(p) for p in paths if p.is_dir()]
        if folders:
            raise InputError(f"{', '.join(folders)}: a folder; give image files to query with (build-index "
                             "indexes folders)")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"query image not found: {', '.join(missing)}")
        stored = self.catalog.get(np.array([item_id(p) for p in paths], dtype=np.int64))
        codes = np.zeros((len(paths), self.catalog.manifest.layout.code_bytes), np.uint8)
        features = np.zeros((len(paths), self.catalog.manifest.feature_dim), np.float32)
        fresh = []
        for row, item in enumerate(stored):
            if item is not None and crops[row] is None and unchanged_since_indexed(paths[row], item.meta):
                codes[row], features[row] = item.code, item.features
            else:
                fresh.append(row)
        if fresh:
            size = self.encoder.input_size
            codes[fresh], features[fresh] = self._decode_and_encode(
                [lambda path=paths[row], crop=crops[row]: load_image(path, size, crop=crop) for row in fresh],
                "cannot read query image", timings)
        return codes, features

    def encode_bytes(self, images: Sequence[bytes], max_pixels: int = MAX_PIXELS, timings: Timings | None = None,
                     crops: Sequence[CropBox | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes and features of image files' bytes (uploads), each decoded only if at most `max_pixels`;
        InputError for anything unusable (BadCropBox for a crop outside its image). `timings`: where to add the
        seconds (default: this searcher's totals); `crops`: a region of each image to search with (None: all)."""
        size = self.encoder.input_size
        crops = crops if crops is not None else [None] * len(images)
        return self._decode_and_encode([lambda data=data, crop=crop: load_image_bytes(data, size, max_pixels, crop)
                                        for data, crop in zip(images, crops)], UNUSABLE_UPLOAD, timings)

    def _decode_and_encode(self, loaders: Sequence[Callable[[], torch.Tensor]], problem: str,
                           timings: Timings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decode (one image per loader) and encode as one batch, each stage timed; an image that does not decode
        is the caller's InputError, worded `problem: why`."""
        timings = timings if timings is not None else self.timings
        start = time.perf_counter()
        batch = stack_images([decode_or_refuse(load, problem) for load in loaders])
        decoded = time.perf_counter()
        codes, features = self.encoder.encode(batch)
        timings.decode += decoded - start
        timings.encode += time.perf_counter() - decoded
        return codes, features

    def search_codes(self, codes: np.ndarray, features: np.ndarray | None, k: int = 10, pool: int | None = None,
                     radius: int | None = None, rerank: bool = True, filter: Filter | None = None,
                     timings: Timings | None = None, nprobe: int | None = None,
                     within_predicted: int = 0) -> list[list[Result]]:
        """The two stages (`CatalogReader.search`) for codes (and features) already computed; `rerank`: False
        for Hamming order alone; `filter`: only items that pass it, exactly; `timings`: where to add the seconds
        per stage (default: this searcher's running totals); `nprobe`: inverted lists to visit per shard on an
        ivf catalog; `within_predicted`: N > 0 searches only the items of each query's N most likely classes (as
        the model predicts them from the query's features), combined with `filter`."""
        timings = timings if timings is not None else self.timings
        filters = (self.predicted_filters(features, within_predicted, filter) if within_predicted
                   else [filter or Filter()] * len(codes))
        results: list[list[Result]] = [[] for _ in range(len(codes))]
        for rule, rows in rows_by_filter(filters).items():  # one catalog search per distinct filter
            query_features = features[rows] if rerank and features is not None else None
            hits = self.catalog.search(codes[rows], query_features, k, pool, radius, nprobe, rule, timings)
            for row, found in zip(rows, hits):
                results[row] = self._results(found)
        return results

    def predicted_filters(self, features: np.ndarray | None, top: int, filter: Filter | None) -> list[Filter | None]:
        """Per query, `filter` narrowed to the labels of its `top` most likely classes: a class is stored under
        its name (a folder's items) or its number (an imported catalog's bare class numbers). None where no
        label can pass (the filter's labels exclude every predicted class)."""
        if features is None:
            raise InputError("within_predicted needs the queries' features")
        filter = filter or Filter()
        names = self.encoder.class_names
        scores = self.encoder.class_scores(features)
        likely = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        filters: list[Filter | None] = []
        for classes in likely:
            labels = {label for c in classes for label in (names[c], str(c))}
            if filter.labels:
                labels &= set(filter.labels)
            filters.append(Filter(tuple(sorted(labels)), filter.where) if labels else None)
        return filters

    def search(self, images: Sequence[str | os.PathLike], k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool = True, filter: Filter | None = None,
               nprobe: int | None = None, crop: CropBox | None = None,
               within_predicted: int = 0) -> list[list[Result]]:
        """Search with image files (`crop`: a region of each); see `search_codes` for the stages."""
        pool = pool_size(k, pool, radius, self.catalog.manifest.bits)  # bad arguments fail before any encoding
        codes, features = self.encode(images, [crop] * len(images))
        return self.search_codes(codes, features, k, pool, radius, rerank, filter, nprobe=nprobe,
                                 within_predicted=within_predicted)

    def stored(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Codes and features (float32) of items already in the catalog; InputError naming the missing ones."""
        items = self.catalog.get(np.asarray(ids, dtype=np.int64))
        missing = [i for i, item in zip(ids, items) if item is None]
        if missing:
            raise InputError(f"ids not in the catalog: {missing[:10]}")
        return (np.stack([item.code for item in items]),
                np.stack([item.features for item in items]).astype(np.float32, copy=False))

    def search_ids(self, ids: Sequence[int], k: int = 10, pool: int | None = None, radius: int | None = None,
                   rerank: bool = True, filter: Filter | None = None, nprobe: int | None = None,
                   within_predicted: int = 0) -> list[list[Result]]:
        """Search with items already in the catalog, using their stored codes and features."""
        codes, features = self.stored(ids)
        return self.search_codes(codes, features, k, pool, radius, rerank, filter, nprobe=nprobe,
                                 within_predicted=within_predicted)

    def query_labels(self, images: Sequence[str | os.PathLike] = (), ids: Sequence[int] = ()) -> list[str | None]:
        """Each query's label where it is known: an indexed image's or item's own label, else the name of the
        image's folder when that names one of the model's classes."""
        record = self.record
        classes = set((record.model_config or {}).get("class_names", [])) if record is not None else set()
        keys = [item_id(Path(p).resolve()) for p in images] + list(ids)
        stored = self.catalog.metadata(np.asarray(keys, dtype=np.int64)) if keys else []
        folders = [Path(p).resolve().parent.name for p in images] + [None] * len(ids)
        return [label if (label := stored_label(meta)) is not None else folder if folder in classes else None
                for meta, folder in zip(stored, folders)]

    def _results(self, hits: Hits) -> list[Result]:
        metas = self.catalog.metadata(hits.ids)
        distances = hits.distances if hits.distances is not None else [None] * len(hits)
        return [Result(rank + 1, int(i), (m or {}).get("path"), stored_label(m), int(h),
                       None if d is None else float(d), (m or {}).get("metadata"))
                for rank, (i, h, d, m) in enumerate(zip(hits.ids, hits.hamming, distances, metas))]

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows_by_filter(filters: Sequence[Filter | None]) -> dict[Filter, list[int]]:
    """The queries' rows grouped by their filter, in first-seen order (None: nothing passes, no search)."""
    groups: dict[Filter, list[int]] = {}
    for row, rule in enumerate(filters):
        if rule is not None:
            groups.setdefault(rule, []).append(row)
    return groups
