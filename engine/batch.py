"""Many queries in one call, each with its own options: the images encoded in batches, the codes searched in one
catalog search per set of options. What `engine.query --jsonl` and `POST /search/batch` run; a query that cannot
be answered (an unusable image, a crop outside it, an id not in the catalog) gets its own error, not the batch's."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np

from engine.encode import NoModelRecorded
from engine.search import Result, Searcher, Timings
from shards.filters import Filter
from shards.ranking import pool_size
from training.images import MAX_PIXELS, CropBox


@dataclass(frozen=True)
class SearchOptions:
    """How one query searches; queries with equal options share the catalog's search calls."""

    k: int = 10
    pool: int | None = None
    radius: int | None = None
    rerank: bool = True
    filter: Filter = field(default_factory=Filter)
    nprobe: int | None = None
    within_predicted: int = 0  # N > 0: only the items of the query's N most likely classes


@dataclass
class BatchQuery:
    """One query: an image (a file's path or an upload's bytes, optionally a region of it) or a catalog id."""

    name: str
    options: SearchOptions = field(default_factory=SearchOptions)
    image: Path | bytes | None = None
    id: int | None = None
    crop: CropBox | None = None


@dataclass
class Answer:
    query: str
    results: list[Result] | None = None
    error: str | None = None  # why this query has no results (then `results` is None)


ENCODE_BATCH = 32  # photos per model call: a request of hundreds of small photos must not hold all their activations


def run_queries(searcher: Searcher, queries: Sequence[BatchQuery], max_pixels: int = MAX_PIXELS,
                timings: Timings | None = None,
                reading: Callable[[], ContextManager] = contextlib.nullcontext) -> list[Answer]:
    """Each query's answer, in order. `reading`: what guards the catalog's reads (a service's read lock); uploads
    are decoded and encoded before it is taken, `ENCODE_BATCH` at a time."""
    timings = timings if timings is not None else Timings()
    answers = [Answer(q.name) for q in queries]
    codes = np.zeros((len(queries), searcher.catalog.manifest.layout.code_bytes), np.uint8)
    features = np.zeros((len(queries), searcher.catalog.manifest.feature_dim), np.float32)
    uploads = [row for row, q in enumerate(queries) if isinstance(q.image, bytes)]
    _encode_rows(uploads, codes, features, answers, lambda chosen: searcher.encode_bytes(
        [queries[r].image for r in chosen], max_pixels, timings, [queries[r].crop for r in chosen]))
    with reading():
        files = [row for row, q in enumerate(queries) if isinstance(q.image, Path)]  # indexed files: stored codes
        _encode_rows(files, codes, features, answers, lambda chosen: searcher.encode(
            [queries[r].image for r in chosen], [queries[r].crop for r in chosen], timings))
        _read_stored(searcher, queries, codes, features, answers)
        _search(searcher, queries, codes, features, answers, timings)
    return answers


def _search(searcher: Searcher, queries: Sequence[BatchQuery], codes: np.ndarray, features: np.ndarray,
            answers: list[Answer], timings: Timings) -> None:
    """One catalog search per distinct set of options, over the queries that have codes."""
    groups: dict[SearchOptions, list[int]] = {}
    for row, query in enumerate(queries):
        if answers[row].error is None:
            groups.setdefault(query.options, []).append(row)
    for options, rows in groups.items():
        try:
            pool = pool_size(options.k, options.pool, options.radius, searcher.catalog.manifest.bits)
            found = searcher.search_codes(codes[rows], features[rows], options.k, pool, options.radius,
                                          options.rerank, options.filter, timings, options.nprobe,
                                          options.within_predicted)
        except ValueError as error:  # every layer's bad input: these options', not the other queries'
            found = [None] * len(rows)
            for row in rows:
                answers[row].error = str(error)
        for row, results in zip(rows, found):
            answers[row].results = results


def _encode_rows(rows: list[int], codes: np.ndarray, features: np.ndarray, answers: list[Answer],
                 encode: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]) -> None:
    """Encode the rows' images `ENCODE_BATCH` at a time; if one of a batch is unusable, that batch's images each
    alone, so that only the unusable ones get an error (good images pay the one-by-one cost only beside a bad one)."""
    for start in range(0, len(rows), ENCODE_BATCH):
        batch = rows[start:start + ENCODE_BATCH]
        try:
            codes[batch], features[batch] = encode(batch)
            continue
        except NoModelRecorded:  # the searcher's, not an image's
            raise
        except ValueError:
            pass
        for row in batch:
            try:
                codes[[row]], features[[row]] = encode([row])
            except NoModelRecorded:
                raise
            except ValueError as error:
                answers[row].error = str(error)


def _read_stored(searcher: Searcher, queries: Sequence[BatchQuery], codes: np.ndarray, features: np.ndarray,
                 answers: list[Answer]) -> None:
    rows = [row for row, q in enumerate(queries) if q.id is not None]
    if not rows:
        return
    items = searcher.catalog.get(np.array([queries[r].id for r in rows], np.int64))
    for row, item in zip(rows, items):
        if item is None:
            answers[row].error = f"no item {queries[row].id} in the catalog"
        else:
            codes[row], features[row] = item.code, item.features
