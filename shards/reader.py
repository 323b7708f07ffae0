"""What every catalog answers, wherever its shards live: the read side's one contract.

`CatalogReader` is implemented by the in-process catalog (`shards.catalog.Catalog`) and by the catalog served by
Ray actors (`shards.cluster.RayCatalog`); `engine.search.Searcher` holds one of them and needs nothing else. Its
`search` is the one two-stage search: the pool (`shards.ranking.pool_size`), the Hamming stage (`coarse`), then
the Euclidean stage (`rerank`), each ranked by the rules of `shards.ranking`. A catalog that can run both stages
in one round trip (Ray) implements `_both_stages` with those same rules; its answers equal the two calls'.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from shards.filters import Filter
from shards.manifest import Manifest
from shards.pairs import PairCount, close_pairs
from shards.ranking import Hits, pool_size

FEATURE_ROWS = 100_000  # feature rows read at a time by `pair_distances`


@dataclass
class StageTimings:
    """Seconds spent per search stage, added up over the searches given this object."""

    coarse: float = 0.0
    rerank: float = 0.0
    remote: float = 0.0  # both stages in one round trip to Ray actors: they cannot be timed apart


class CatalogReader(ABC):
    """A catalog's items and the two search stages over them. Ids are non-negative 64-bit integers; per-id reads
    answer in the order asked, with None (or False) for ids the catalog does not hold."""

    path: Path
    manifest: Manifest

    @property
    def bits(self) -> int:
        return self.manifest.bits

    @abstractmethod
    def __len__(self) -> int:
        """Items held."""

    @abstractmethod
    def get(self, ids: Sequence[int] | np.ndarray) -> list:
        """Full items (`shards.catalog.Item`: id, code, features, metadata), None for absent ids."""

    @abstractmethod
    def metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict | None]:
        """Metadata of the given ids (None for absent ids or items stored without any)."""

    @abstractmethod
    def present(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """A mask of the ids the catalog holds."""

    @abstractmethod
    def features(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 features of the given ids, which must all be held."""

    @abstractmethod
    def codes(self, filter: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every item's id, ascending, and its code zero-padded to 64-bit words (only items that pass `filter`):
        what an all-pairs search (`close_pairs`) scans; 8 bytes an item for codes of up to 64 bits."""

    @abstractmethod
    def coarse(self, query_codes: np.ndarray, m: int | None = None, radius: int | None = None,
               filter: Filter | None = None, nprobe: int | None = None) -> list[Hits]:
        """Hamming stage: per query, the m nearest codes, or every code within `radius` (capped at m if both
        are given), by (distance, id); only items that pass `filter`, exactly. `nprobe`: inverted lists each
        shard visits on an ivf catalog (default: `shards.index.default_nprobe`)."""

    @abstractmethod
    def rerank(self, query_features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        """Euclidean stage: the k nearest of each query's candidates by exact distance on stored features, ties
        by id."""

    @abstractmethod
    def refresh(self) -> None:
        """See what writers committed since opening (or the last refresh)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the catalog holds."""

    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None, k: int = 10,
               pool: int | None = None, radius: int | None = None, nprobe: int | None = None,
               filter: Filter | None = None, timings: StageTimings | None = None) -> list[Hits]:
        """Two-stage search for a batch of queries: a Hamming pool (`pool` nearest codes, default
        max(100 k, 1000), or every code within `radius`), re-ranked by Euclidean distance; Hamming order alone
        without features. `nprobe`, `filter`: see `coarse`; `timings`: where to add the seconds per stage."""
        pool = pool_size(k, pool, radius, self.bits)
        timings = timings if timings is not None else StageTimings()
        filter = filter or None  # an empty filter passes everything
        if query_features is not None:
            return self._both_stages(query_codes, query_features, k, pool, radius, nprobe, filter, timings)
        start = time.perf_counter()
        hits = [Hits(h.ids[:k], h.hamming[:k]) for h in self.coarse(query_codes, pool, radius, filter, nprobe)]
        timings.coarse += time.perf_counter() - start
        return hits

    def _both_stages(self, query_codes: np.ndarray, query_features: np.ndarray, k: int, pool: int | None,
                     radius: int | None, nprobe: int | None, filter: Filter | None,
                     timings: StageTimings) -> list[Hits]:
        """`coarse`, then `rerank` of its pools, each timed."""
        start = time.perf_counter()
        candidates = self.coarse(query_codes, pool, radius, filter, nprobe)
        coarse_done = time.perf_counter()
        hits = self.rerank(query_features, candidates, k)
        timings.coarse += coarse_done - start
        timings.rerank += time.perf_counter() - coarse_done
        return hits

    def close_pairs(self, radius: int, filter: Filter | None = None, count: PairCount | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every pair of items whose codes lie within Hamming `radius`, exactly (`shards.pairs`): chunks of (first
        ids, second ids, distances), first < second, each pair once; only items that pass `filter`. `count`: where
        to add the pairs compared and the longest run of equal keys."""
        ids, codes = self.codes(filter or None)
        for first, second, distance in close_pairs(codes, self.bits, radius, count):
            yield ids[first], ids[second], distance

    def pair_distances(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Euclidean distances between the stored features of pairs of held items: each distinct item's row read
        once (`features`: checked), FEATURE_ROWS at a time, and the pairs measured by Faiss (~8x faster than
        numpy's gathers). Memory: 4 bytes x feature_dim per distinct item."""
        nodes = np.unique(np.concatenate([first, second]))
        table = np.empty((len(nodes), self.manifest.feature_dim), np.float32)
        for start in range(0, len(nodes), FEATURE_ROWS):
            table[start:start + FEATURE_ROWS] = self.features(nodes[start:start + FEATURE_ROWS])
        left = np.searchsorted(nodes, first).astype(np.int64)
        right = np.searchsorted(nodes, second).astype(np.int64)
        squared = np.empty(len(first), np.float32)
        faiss.pairwise_indexed_L2sqr(table.shape[1], len(first), faiss.swig_ptr(table), faiss.swig_ptr(left),
                                     faiss.swig_ptr(table), faiss.swig_ptr(right), faiss.swig_ptr(squared))
        return np.sqrt(np.maximum(squared, 0))

    def __enter__(self) -> "CatalogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
