"""The ranking rules every search path shares: the in-process catalog, a catalog's shards searched in threads,
and shard groups searched on a Ray cluster. Coarse results merge by (Hamming distance, id); the fine stage
orders a pool by (Euclidean distance, id). Ties are therefore broken the same way wherever the shards live.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shards.errors import InvalidArgumentError


@dataclass
class Hits:
    """One query's results, best first: ids, their Hamming distances and (after re-ranking) Euclidean ones."""

    ids: np.ndarray
    hamming: np.ndarray
    distances: np.ndarray | None = None
    # Where each hit lies in the catalog's id order, when the coarse stage scanned one index over every item:
    # lets the re-ranking stage find the features without looking the ids up again.
    positions: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray | slice) -> "Hits":
        """The hits at these rows (indices, a mask or a slice), with whatever they carry."""
        def part(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[rows]
        return Hits(self.ids[rows], self.hamming[rows], part(self.distances), part(self.positions))


def merge_hits(per_query: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], limit: int | None) -> list[Hits]:
    """Exact merge: per query, the (hamming, ids) parts that shards returned, ordered by (distance, id) and cut
    at `limit` (None: keep all)."""
    merged = []
    for parts in per_query:
        hamming = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int32)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        order = np.lexsort((ids, hamming))[:limit]
        merged.append(Hits(ids[order], hamming[order].astype(np.int32)))
    return merged


def nearest(ids: np.ndarray, squared: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k nearest of a pool by squared Euclidean distance, ties by id."""
    return np.lexsort((ids, squared))[:k]


def prefix_nearest(ids: np.ndarray, squared: np.ndarray, k: int) -> np.ndarray:
    """Positions (ascending) that hold the k nearest of every prefix of a coarse-ordered pool: when only a
    prefix of a shard group's pool makes the merged pool, its k nearest are among these, whatever its length.

    A superset, found on a doubling schedule: an item past position c can only be among the k nearest of a
    prefix if it is no farther than the k-th nearest of the first c (that distance only falls as the prefix
    grows). About k * (1 + log2(n / k)) positions of n, against n for ranking the whole pool."""
    keep = np.zeros(len(squared), bool)
    keep[:k] = True
    seen = k
    while seen < len(squared):
        kth = np.partition(squared[:seen], k - 1)[k - 1]
        end = min(2 * seen, len(squared))
        keep[seen:end] = squared[seen:end] <= kth
        seen = end
    return np.flatnonzero(keep)


# The smallest default pool: a search for 1 result re-ranks the same candidates as one for 10, so its answer
# heads that list (a pool of 100 * k alone lets the top result change with k).
MIN_DEFAULT_POOL = 1000


def pool_size(k: int, pool: int | None, radius: int | None, bits: int | None = None) -> int | None:
    """The coarse pool a search for k results asks for: `pool`, or max(100 * k, MIN_DEFAULT_POOL) when neither it
    nor a radius is given. Checks the arguments (a radius past the code length `bits` could only mean everything)."""
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    if pool is not None and pool < 1:
        raise InvalidArgumentError(f"pool must be at least 1, got {pool}")
    if radius is not None and not 0 <= radius <= (bits if bits is not None else radius):
        raise InvalidArgumentError(f"radius must be between 0 and the code length ({bits} bits), got {radius}"
                           if bits is not None else f"radius must be at least 0, got {radius}")
    return max(100 * k, MIN_DEFAULT_POOL) if pool is None and radius is None else pool
