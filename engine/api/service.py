"""What the endpoints share: the searcher (the reader), the writer when writes are allowed, their locks and the
metrics; and the service's writes (a photo added or deleted with its item), crash-safe through the catalog's
batches. Raises the layers' errors and its own (`ItemExists`, `OutOfRoom`); `engine.api.handlers` words them as
HTTP statuses."""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.api.batching import BatchSettings, EncodeBatcher, decode_upload
from engine.batch import Answer, BatchQuery, run_queries
from engine.errors import EngineError
from engine.fetch import FetchPolicy, fetch
from engine.metadata import parse_product_metadata
from engine.record import item_id, item_record, write_record
from engine.search import Result, Searcher, Timings
from engine.uploads import is_upload, keep_upload, orphan_uploads, remove_uploads, upload_file
from shards import Catalog
from shards.filters import Filter, stored_label
from training.cli import STORAGE_ERRORS
from training.images import MAX_PIXELS, CropBox

log = logging.getLogger(__name__)
WARM_UP_WAIT = 10  # seconds close() gives a model still loading at start

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)  # LMDB reports a short write to a full disk as EIO


class ItemExists(EngineError):
    """The photo is already an item, with another label or product metadata than the add names."""

    def __init__(self, item: int):
        super().__init__(f"item {item} already holds this photo, with another label or metadata; delete it "
                         "first to add it again")
        self.item = item


class OutOfRoom(EngineError):
    """A write found no room (a full disk or quota, a file-size limit, a catalog file that could not grow):
    the server's lack, not the client's mistake nor a bug."""


class ReadWriteLock:
    """Many searches at once, or one writer (refreshing the reader's snapshot frees memory searches may read)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class Metrics:
    """Prometheus metrics of one service: requests by endpoint and status, seconds per search stage, items."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("latenthash_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.stages = Histogram("latenthash_stage_seconds", "Seconds per search stage", ["stage"],
                                registry=self.registry,
                                buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.items = Gauge("latenthash_catalog_items", "Items in the catalog", registry=self.registry)
        self.batch_sizes = Histogram("latenthash_encode_batch_size", "Photos per batch the model encoded",
                                     registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))

    def observe(self, timings: Timings) -> None:
        for stage in fields(timings):
            if getattr(timings, stage.name):
                self.stages.labels(stage.name).observe(getattr(timings, stage.name))


class Service:
    """A catalog served: searches run concurrently (a read lock), writes one at a time (the write lock), and a
    committed write is made visible to searches before it is answered."""

    def __init__(self, catalog_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 read_only: bool = False, token: str | None = None, max_upload_mb: float = 20,
                 device: str = "auto", ray: str | None = None, shards_per_actor: int = 1,
                 max_pixels: int = MAX_PIXELS, batching: BatchSettings | None = None,
                 urls: FetchPolicy | None = None):
        self.catalog_dir = Path(catalog_dir)
        self.read_only, self.token = read_only, token
        self.max_upload = int(max_upload_mb * (1 << 20))
        self.max_pixels = max_pixels
        self.url_policy = replace(urls or FetchPolicy(), max_bytes=self.max_upload)  # a URL's photo: an upload's limit
        self.writer = None if read_only or ray is not None else Catalog.open(self.catalog_dir, readonly=False)
        if self.writer is not None:  # holding the writer lock: no add is half done
            remove_orphan_uploads(self.catalog_dir, self.writer)
        # One Faiss thread per search: concurrent requests fill the cores (a second thread never speeds up one
        # query on these machines: docs/ARCHITECTURE.md, "Facts the design rests on"), and no OpenMP teams are
        # started from many threads at once.
        self.searcher = Searcher(self.catalog_dir, model_dir, device, threads=1, ray=ray,
                                 shards_per_actor=shards_per_actor)
        if ray is not None and not read_only:  # writes go to the actors that own the items' shards
            self.writer = self.searcher.catalog
        self.lock = ReadWriteLock()
        self.write_lock = threading.Lock()
        self.duplicate_search = threading.Lock()  # one GET /duplicates at a time
        self.metrics = Metrics()
        self.metrics.items.set(len(self.searcher.catalog))
        self.batcher = None if batching is None else EncodeBatcher(  # None: each photo encodes alone
            lambda pixels: self.searcher.encoder.encode(pixels), batching, self.metrics.batch_sizes.observe)
        self._warming = threading.Thread(target=self._warm_up, name="model-warm-up", daemon=True)
        self._warming.start()

    def _warm_up(self) -> None:
        """The model loaded and compiled while the service starts answering (searches by id need none; a photo
        search that comes first waits for it). A failure here is the photo searches' to report."""
        try:
            self.searcher.warm_up()
        except Exception as error:  # noqa: BLE001 - any load failure: the first photo search raises it again
            log.warning("the model did not load at start (%s): searches by photo will report it", error)

    @property
    def image_roots(self) -> list[str]:
        """Folders whose images items may show (the catalog's record; an add extends it with the uploads')."""
        return self.searcher.record.image_roots if self.searcher.record is not None else []

    @property
    def model_ready(self) -> bool:
        """Whether searches by photo find the model loaded: by the warm-up at start, or by a search since."""
        return self.searcher.model_loaded

    def close(self) -> None:
        self._warming.join(WARM_UP_WAIT)  # a start still compiling is not waited for: the thread only reads the model
        if self.batcher is not None:
            self.batcher.close()
        with self.lock.writing():
            self.searcher.close()
            if self.writer is not None and self.writer is not self.searcher.catalog:
                self.writer.close()

    def search(self, codes: np.ndarray, features: np.ndarray, k: int, pool: int | None, radius: int | None,
               rerank: bool, filter: Filter, nprobe: int | None, timings: Timings,
               within_predicted: int = 0) -> list[Result]:
        """The one query's results (the searcher's two stages), its seconds per stage added to the metrics."""
        with self.lock.reading():
            results = self.searcher.search_codes(codes, features, k=k, pool=pool, radius=radius, rerank=rerank,
                                                 filter=filter, timings=timings, nprobe=nprobe,
                                                 within_predicted=within_predicted)[0]
        self.metrics.observe(timings)
        return results

    def search_batch(self, queries: list[BatchQuery], timings: Timings) -> list[Answer]:
        """Many queries' answers (`engine.batch`: the photos encoded as one batch, one search per set of options),
        the seconds per stage added to the metrics."""
        answers = run_queries(self.searcher, queries, self.max_pixels, timings, self.lock.reading)
        self.metrics.observe(timings)
        return answers

    def fetch_photo(self, url: str) -> bytes:
        """The photo at `url` for an add, fetched as engine.fetch does (no loopback or private address unless the
        operator allowed it, redirects checked, timeouts, at most the upload limit): RefusedURL, FetchFailed."""
        return fetch(url, self.url_policy).data

    def encode_photo(self, data: bytes, timings: Timings, crop: CropBox | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Code and features of an uploaded photo, or of its `crop` region (InputError for one that is no usable
        image, BadCropBox for a crop outside it); encoded with concurrent searches' photos unless batching is off."""
        if self.batcher is None:
            return self.searcher.encode_bytes([data], self.max_pixels, timings, [crop])
        size = self.searcher.encoder.input_size
        return self.batcher.encode(lambda: decode_upload(data, size, self.max_pixels, crop), timings)

    def item(self, item: int) -> dict | None:
        """An item's path, label and product metadata as the API shows them; None if it is not there."""
        with self.lock.reading():
            record = self.searcher.catalog.metadata([item])[0]
            present = self.searcher.catalog.present([item])[0]
        if not present:
            return None
        return {"id": item, "path": (record or {}).get("path"), "label": stored_label(record),
                "metadata": (record or {}).get("metadata")}

    def add_photo(self, data: bytes, label: str | None, product_json: str | None) -> int:
        """Add an uploaded photo with its label and product metadata (JSON text) and make it searchable; its id.
        The same photo again is the same item: fine with the same label and metadata, ItemExists otherwise."""
        product = parse_product_metadata(product_json)
        codes, features = self.encode_photo(data, Timings())
        with self.write_lock, out_of_room_as_error("nothing was added"):
            item = self._add(data, label, product, codes, features)
            self.refresh()
        return item

    def delete_photo(self, item: int) -> bool:
        """Delete an item and then the photo it was added with (a kill in between leaves an orphan, removed when
        a writer next opens the catalog); whether the item was there."""
        with self.write_lock, out_of_room_as_error("nothing was deleted"):
            record = self.writer.metadata([item])[0]
            if not self.writer.delete([item]):
                return False
            path = (record or {}).get("path")
            if is_upload(self.catalog_dir, path):
                Path(path).unlink(missing_ok=True)
            self.refresh()
        return True

    def refresh(self) -> None:
        """Make a committed write visible to searches (callers hold the write lock)."""
        with self.lock.writing():
            self.searcher.refresh()
        self.metrics.items.set(len(self.searcher.catalog))

    def _add(self, data: bytes, label: str | None, product: dict | None, codes: np.ndarray,
             features: np.ndarray) -> int:
        """Keep the photo inside the catalog folder and add its item in one crash-safe batch (the photo goes
        if the batch fails: no item refers to it)."""
        file = upload_file(self.catalog_dir, data)
        item = item_id(file)
        if self.writer.present([item])[0]:
            stored = self.writer.metadata([item])[0] or {}
            if (stored.get("label"), stored.get("metadata")) != (label, product):
                raise ItemExists(item)
            return item
        file.parent.mkdir(exist_ok=True)
        self._trust_uploads(file.parent)
        keep_upload(file, data)
        try:
            self.writer.add([item], codes, features, [item_record(file, label, file.stat(), product)])
        except BaseException:
            file.unlink(missing_ok=True)
            raise
        return item

    def _trust_uploads(self, folder: Path) -> None:
        """Record the uploads folder among the catalog's image folders, so that added items show their photos."""
        record = self.searcher.record
        if record is not None and str(folder) not in record.image_roots:
            record.image_roots.append(str(folder))
            write_record(self.catalog_dir, record)


def remove_orphan_uploads(catalog_dir: Path, writer: Catalog) -> None:
    orphans = orphan_uploads(catalog_dir, writer)
    if orphans:
        print(remove_uploads(orphans), file=sys.stderr)


@contextmanager
def out_of_room_as_error(outcome: str) -> Iterator[None]:
    """A write that ran out of room raises OutOfRoom, saying what ran out and `outcome` (what was left undone)."""
    try:
        yield
    except Exception as problem:
        lack = storage_failure(problem)
        if lack is None:
            raise
        raise OutOfRoom(f"insufficient storage: {lack}; {outcome}") from problem


def storage_failure(problem: BaseException) -> str | None:
    """What ran out, if a full disk, quota or file-size limit caused `problem` (the catalog wraps the OS's and
    LMDB's errors in its own: the causes are followed)."""
    import lmdb

    while problem is not None:
        if isinstance(problem, OSError) and problem.errno in FULL_DISK:
            return STORAGE_ERRORS[problem.errno]
        if isinstance(problem, lmdb.DiskError):
            return "the disk is full"
        if isinstance(problem, lmdb.MapFullError):
            return "the catalog's file is full and could not grow"
        if isinstance(problem, lmdb.Error) and os.strerror(errno.EIO) in str(problem):  # LMDB names no errno
            return "an input/output error writing the catalog (a full disk or a failing device)"
        problem = problem.__cause__ or problem.__context__
    return None
