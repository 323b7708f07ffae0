"""Index types, one class each behind one registry, and `CodeIndex`: a shard's ids, codes and Faiss index.

A `CodeIndex` keeps ids sorted ascending and its codes in the same order. Scanning in id order is what makes
ties come out broken by id: Faiss's counting selection (`use_heap=False`) keeps equal distances in scan order,
with 1 or more threads (checked against brute force in the tests). Types whose results come back in another
order (hash buckets, inverted lists) are re-sorted by (distance, id).

Faiss is imported where it is used, so that command lines can list the types (`--index`) without it.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from shards.errors import InvalidArgumentError


class IndexType:
    """How one kind of Faiss binary index is built over a shard's padded codes and searched. A new kind is one
    subclass registered with `@register_index_type`; the catalog, the manifest checks and the CLIs' `--index`
    choices all read the registry."""

    name: ClassVar[str]
    summary: ClassVar[str]
    faiss_class: ClassVar[str]  # what a stored index of this type deserializes to
    merges_across_shards: ClassVar[bool] = False  # searched as one index over every shard (one Faiss call)
    scan_order: ClassVar[bool] = False  # results already sorted by (distance, id)

    def build(self, padded: np.ndarray, hash_bits: int, previous=None):
        """A Faiss index over `padded` codes; `previous`: this shard's last index of this type, whose training
        (if any) may be reused."""
        raise NotImplementedError

    def knn_parameters(self, index, nprobe: int | None, m: int):
        """Faiss search parameters for a top-m search (None: the index's own settings)."""
        return None

    def search_radius(self, code_index: "CodeIndex", padded_queries: np.ndarray, radius: int) -> list:
        """Per query, (distances, ids) of every item within `radius`, unsorted: a range search on the index."""
        limits, distances, positions = code_index.index.range_search(padded_queries, radius + 1)
        return per_query_ranges(limits, distances, positions, code_index.ids)


def per_query_ranges(limits: np.ndarray, distances: np.ndarray, positions: np.ndarray,
                     ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A Faiss range search's flat result (query q's hits at limits[q]:limits[q + 1]) as (distances, ids) per
    query."""
    return [(distances[a:b].astype(np.int32), ids[positions[a:b]]) for a, b in zip(limits[:-1], limits[1:])]


INDEX_TYPES: dict[str, IndexType] = {}


def register_index_type(cls: type[IndexType]) -> type[IndexType]:
    INDEX_TYPES[cls.name] = cls()
    return cls


def index_type(name: str) -> IndexType:
    """The registered type called `name`; an error that lists the choices otherwise."""
    if name not in INDEX_TYPES:
        raise InvalidArgumentError(f"unknown index type {name!r}; choose one of {', '.join(INDEX_TYPES)}")
    return INDEX_TYPES[name]


def describe_index_types() -> str:
    """One line per type, for the help of the `--index` flags."""
    return "; ".join(f"{kind.name}: {kind.summary}" for kind in INDEX_TYPES.values())


@register_index_type
class FlatIndex(IndexType):
    name = "flat"
    faiss_class = "IndexBinaryFlat"
    summary = "exact scan of every code (one merged index over all shards); right up to a few million items"
    merges_across_shards = True
    scan_order = True

    def build(self, padded: np.ndarray, hash_bits: int = 0, previous=None):
        import faiss

        index = faiss.IndexBinaryFlat(padded.shape[1] * 8)
        if len(padded):
            index.add(padded)
        return index


KNN_HASH_FLIPS = 2  # top-m on an IndexBinaryHash looks this many bit flips around the query's bucket


@register_index_type
class HashIndex(IndexType):
    name = "hash"
    faiss_class = "IndexBinaryHash"
    summary = "multi-bucket hash on the first 16 bits of each code: approximate top-m, exact radius search"
    def build(self, padded: np.ndarray, hash_bits: int, previous=None):
        import faiss

        index = faiss.IndexBinaryHash(padded.shape[1] * 8, min(hash_bits, padded.shape[1] * 8))
        if len(padded):
            index.add(padded)
        return index

    def knn_parameters(self, index, nprobe: int | None, m: int):
        index.nflip = min(KNN_HASH_FLIPS, index.b)
        return None

    def search_radius(self, code_index: "CodeIndex", padded_queries: np.ndarray, radius: int) -> list:
        code_index.index.nflip = min(radius, code_index.index.b)  # every bucket the radius can reach: exact
        return super().search_radius(code_index, padded_queries, radius)


IVF_TRAIN_PER_LIST = 64  # codes sampled per list to train the coarse quantizer
IVF_TRAIN_ITERATIONS = 10  # k-means rounds (binary codes settle fast; training stays seconds at 10M)
IVF_RETRAIN_GROWTH = 2  # retrain once the shard calls for this many times the lists it was trained with


def ivf_lists(items: int) -> int:
    """Inverted lists for a shard of `items` codes: sqrt(items), Faiss's usual choice (1M: 1,000 lists of
    ~1,000; 12.5M, a 100M catalog in 8 shards: 3,535), with at least IVF_TRAIN_PER_LIST codes to train each."""
    return max(1, min(math.isqrt(items), items // IVF_TRAIN_PER_LIST))


POOL_SPREAD = 32  # lists per list's worth of pool; 100k synthetic codes: 20x gave recall@1000 0.94-0.96, 32x 0.98


def default_nprobe(nlist: int, items: int, m: int) -> int:
    """Lists probed for a top-m search when the caller does not say: 1/64 of them, at least 16, and at least
    POOL_SPREAD times the lists a pool of m fills on average (m * nlist / items). At 10M and 100M synthetic
    codes the first rule rules (49-55 lists; recall@10 >= 0.98 from 4 up); at 100k items a pool of 1,000 spans
    many lists and the second does (102 of 316, where 16 gave recall@1000 0.62; RESULTS.md)."""
    return min(nlist, max(16, nlist // 64, math.ceil(POOL_SPREAD * m * nlist / max(1, items))))


@register_index_type
class IVFIndex(IndexType):
    name = "ivf"
    faiss_class = "IndexBinaryIVF"
    summary = ("inverted lists over binary k-means (Faiss IndexBinaryIVF): approximate top-m for 10M+ items, "
               "nprobe trades recall for speed; radius search scans every code (exact)")
    def build(self, padded: np.ndarray, hash_bits: int = 0, previous=None):
        import faiss

        nlist = ivf_lists(len(padded))
        if previous is not None and previous.nlist * IVF_RETRAIN_GROWTH > nlist:
            index = faiss.clone_binary_index(previous)  # keep the trained lists: adds stay cheap
            index.reset()
        else:
            index = faiss.index_binary_factory(padded.shape[1] * 8, f"BIVF{nlist}")
            sample = padded
            if len(padded) > IVF_TRAIN_PER_LIST * nlist:
                rows = np.random.default_rng(len(padded)).choice(len(padded), IVF_TRAIN_PER_LIST * nlist,
                                                                 replace=False)
                sample = padded[np.sort(rows)]
            index.cp.min_points_per_centroid = 1  # small shards: no warning; few lists there anyway
            index.cp.niter = IVF_TRAIN_ITERATIONS
            index.train(sample if len(sample) else np.zeros((1, padded.shape[1]), np.uint8))
        if len(padded):
            index.add(padded)
        return index

    def knn_parameters(self, index, nprobe: int | None, m: int):
        import faiss

        probes = default_nprobe(index.nlist, index.ntotal, m) if nprobe is None else nprobe
        return faiss.SearchParametersIVF(nprobe=max(1, min(probes, index.nlist)))

    def search_radius(self, code_index: "CodeIndex", padded_queries: np.ndarray, radius: int) -> list:
        return scan_radius(code_index, padded_queries, radius)


def scan_radius(code_index: "CodeIndex", padded_queries: np.ndarray, radius: int) -> list:
    """Every item within `radius`, by a flat scan of the codes (no second index kept in memory)."""
    import faiss

    result = faiss.RangeSearchResult(len(padded_queries))
    codes = code_index.codes
    faiss.hamming_range_search(faiss.swig_ptr(padded_queries), faiss.swig_ptr(codes), len(padded_queries),
                               len(codes), radius + 1, codes.shape[1], result)  # Faiss: distance < its radius
    limits = faiss.rev_swig_ptr(result.lims, len(padded_queries) + 1)
    distances = faiss.rev_swig_ptr(result.distances, int(limits[-1]))
    positions = faiss.rev_swig_ptr(result.labels, int(limits[-1]))
    return per_query_ranges(limits, distances, positions, code_index.ids)  # copies, while `result` holds the data


def find_sorted(known: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `ids` in the ascending array `known`, and a mask of the ids it does not hold."""
    if len(known) == 0:
        return np.zeros(len(ids), np.int64), np.ones(len(ids), bool)
    positions = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return positions, known[positions] != ids


class CodeIndex:
    def __init__(self, ids: np.ndarray, codes: np.ndarray, kind: IndexType, index=None, hash_bits: int = 0,
                 previous: "CodeIndex | None" = None):
        """`index`: a Faiss index of type `kind` already built over `codes` (loaded from disk); built otherwise,
        reusing what `previous` learned where the type can."""
        self.ids, self.codes, self.kind = ids, codes, kind
        if index is None:
            index = kind.build(codes, hash_bits, previous.index if previous is not None
                               and previous.kind is kind else None)
        self.index = index
        if kind.scan_order:  # a runtime setting, not serialized: set it on built and deserialized indices alike
            index.use_heap = False  # counting selection: faster here, and keeps ties in scan (= id) order

    def __len__(self) -> int:
        return len(self.ids)

    def search_knn(self, padded_queries: np.ndarray, m: int,
                   nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, ids, positions in this index) of the m nearest codes per query, sorted by (distance, id);
        id and position -1 pad. `nprobe`: inverted lists to visit, for the types that have them."""
        k = min(m, len(self.ids))
        if k == 0:
            empty = np.empty((len(padded_queries), 0))
            return empty.astype(np.int32), empty.astype(np.int64), empty.astype(np.int64)
        distances, positions = self.index.search(padded_queries, k,
                                                 params=self.kind.knn_parameters(self.index, nprobe, k))
        ids = np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)
        if not self.kind.scan_order:
            missing = ids < 0
            order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, ids),
                                np.where(missing, np.iinfo(np.int32).max, distances)), axis=-1)
            distances, ids = np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
            positions = np.take_along_axis(positions, order, 1)
        return distances.astype(np.int32), ids, positions

    def search_radius(self, padded_queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, every item within Hamming distance `radius` (inclusive), unsorted."""
        if len(self.ids) == 0:
            return [(np.empty(0, np.int32), np.empty(0, np.int64)) for _ in padded_queries]
        return self.kind.search_radius(self, padded_queries, radius)
