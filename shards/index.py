"""Ids sorted ascending, their padded codes in the same order, and the Faiss binary index over them.

Scanning in id order is what makes ties come out broken by id: Faiss's counting selection (`use_heap=False`)
keeps equal distances in scan order, with 1 or more threads (checked against brute force in the tests).
"""
from __future__ import annotations

import faiss
import numpy as np

KNN_HASH_FLIPS = 2  # top-m on an IndexBinaryHash looks this many bit flips around the query's bucket


def make_faiss_index(index_type: str, bits: int, hash_bits: int, padded: np.ndarray) -> faiss.IndexBinary:
    d = padded.shape[1] * 8
    if index_type == "flat":
        index = faiss.IndexBinaryFlat(d)
    else:
        index = faiss.IndexBinaryHash(d, min(hash_bits, bits))
    if len(padded):
        index.add(padded)
    return index


def find_sorted(known: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `ids` in the ascending array `known`, and a mask of the ids it does not hold."""
    if len(known) == 0:
        return np.zeros(len(ids), np.int64), np.ones(len(ids), bool)
    positions = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return positions, known[positions] != ids


class CodeIndex:
    def __init__(self, ids: np.ndarray, codes: np.ndarray, index: faiss.IndexBinary):
        self.ids, self.codes, self.index = ids, codes, index
        self.is_flat = isinstance(index, faiss.IndexBinaryFlat)
        if self.is_flat:  # a runtime setting, not serialized: set it on built and deserialized indices alike
            index.use_heap = False  # counting selection: faster here, and keeps ties in scan (= id) order

    def __len__(self) -> int:
        return len(self.ids)

    def search_knn(self, padded_queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, ids, positions in this index) of the m nearest codes per query, sorted by (distance, id);
        id and position -1 pad."""
        k = min(m, len(self.ids))
        if k == 0:
            empty = np.empty((len(padded_queries), 0))
            return empty.astype(np.int32), empty.astype(np.int64), empty.astype(np.int64)
        if not self.is_flat:
            self.index.nflip = min(KNN_HASH_FLIPS, self.index.b)
        distances, positions = self.index.search(padded_queries, k)
        ids = np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)
        if not self.is_flat:  # hash buckets come back in bucket order
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
        if not self.is_flat:
            self.index.nflip = min(radius, self.index.b)  # visit every bucket the radius can reach: exact
        limits, distances, positions = self.index.range_search(padded_queries, radius + 1)
        return [(distances[limits[q]:limits[q + 1]].astype(np.int32), self.ids[positions[limits[q]:limits[q + 1]]])
                for q in range(len(padded_queries))]
