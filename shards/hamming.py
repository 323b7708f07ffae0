"""The coarse (Hamming) stage of an in-process catalog: which indices it scans, how the scans run in parallel,
and the exact merge of their answers (ties by id, as `shards.ranking` rules)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import faiss
import numpy as np

from shards.filters import Filter, FilterIndex
from shards.index import CodeIndex, find_sorted, index_type
from shards.ranking import Hits, merge_hits
from shards.shard_set import ShardSet

FILTERS_KEPT = 16  # filtered indices kept per snapshot: the filters used last


def _per_query(tasks: list, parts: list, n_queries: int) -> list[list]:
    """Regroup what each (unit, query slice) task found into one list of parts per query."""
    per_query: list[list] = [[] for _ in range(n_queries)]
    for (_, rows), found in zip(tasks, parts):
        for q, hits in zip(range(rows.start, rows.stop), found):
            per_query[q].append(hits)
    return per_query


class HammingStage:
    """Scans `store`'s codes on `threads` threads; keeps a merged index over every shard (flat catalogs) and the
    indices of recent filters, each until the shards' indices change (`forget_filters` after a write)."""

    def __init__(self, store: ShardSet, threads: int):
        self.store, self.threads = store, threads
        self._pool: ThreadPoolExecutor | None = None
        self._merged: CodeIndex | None = None
        self._merged_from: list[CodeIndex] = []
        self.forget_filters()

    def forget_filters(self) -> None:
        """After a refresh or a write: the filter indices describe the items as they were."""
        self._filters: FilterIndex | None = None
        self._filtered: dict[Filter, CodeIndex] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def search(self, padded_queries: np.ndarray, m: int | None, radius: int | None, filter: Filter | None,
               nprobe: int | None) -> list[Hits]:
        """Per query, the m nearest codes or every code within `radius` (capped at m), merged exactly; only the
        items that pass `filter`, if one is given (arguments checked by the caller)."""
        units = self._units() if not filter else [self.filtered(filter)]
        if radius is None:
            tasks, parts = self._run(lambda t: t[0].search_knn(padded_queries[t[1]], m, nprobe), units,
                                     len(padded_queries))
            hits = self._merge_knn(parts, tasks, units, len(padded_queries), m)
            if filter:  # positions in a subset are not the catalog's id order
                for h in hits:
                    h.positions = None
            return hits
        tasks, parts = self._run(lambda t: t[0].search_radius(padded_queries[t[1]], radius), units,
                                 len(padded_queries))
        return merge_hits(_per_query(tasks, parts, len(padded_queries)), m)

    def _units(self) -> list[CodeIndex]:
        """What coarse search scans. A flat catalog scans one CodeIndex over every shard: exactly 'one flat index
        over all items', and Faiss's fixed cost per call (~0.6 ms for a 1,000-item selection here) is paid once
        instead of once per shard. It is rebuilt after a write. A hash catalog scans each shard's own index."""
        for shard in self.store.shards:
            shard.sync_index()
        indexes = [shard.code_index for shard in self.store.shards]
        if not index_type(self.store.manifest.index_type).merges_across_shards or len(indexes) == 1:
            return indexes
        if self._merged is None or any(a is not b for a, b in zip(self._merged_from, indexes)):
            ids, order = self.store.ids_in_order()
            codes = np.concatenate([i.codes for i in indexes])[order]
            self._merged = CodeIndex(ids, codes, index_type("flat"))
            self._merged_from = indexes
        return [self._merged]

    def _run(self, function: Callable, units: list[CodeIndex], n_queries: int) -> tuple[list, list]:
        """Apply `function((unit, query_slice))` to every task; returns (tasks, results). One unit: one Faiss call
        on `threads` OpenMP threads (set for the calling thread). Several: units and query chunks in parallel on
        the pool, whose threads each run Faiss single-threaded (Faiss releases the GIL)."""
        if len(units) == 1:
            tasks = [(units[0], slice(0, n_queries))]
            faiss.omp_set_num_threads(self.threads)
            return tasks, [function(tasks[0])]
        chunks = max(1, min(n_queries // 16, -(-self.threads // len(units))))
        bounds = np.linspace(0, n_queries, chunks + 1).astype(int)
        tasks = [(unit, slice(a, b)) for unit in units for a, b in zip(bounds[:-1], bounds[1:])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, initializer=faiss.omp_set_num_threads, initargs=(1,))
        return tasks, list(self._pool.map(function, tasks))

    @staticmethod
    def _merge_knn(parts: list, tasks: list, units: list[CodeIndex], n_queries: int, m: int) -> list[Hits]:
        if len(units) == 1:  # one id-ordered index over every item: its positions are the catalog's id order
            (distances, found, positions), = parts
            return [Hits(i[i >= 0], d[i >= 0], positions=p[i >= 0]) for d, i, p in zip(distances, found, positions)]
        found = [[(d[i >= 0], i[i >= 0]) for d, i in zip(*part[:2])] for part in parts]
        return merge_hits(_per_query(tasks, found, n_queries), m)

    def filtered(self, filter: Filter) -> CodeIndex:
        """`restrict` to the items that pass `filter` (kept for the filters used last until `forget_filters`)."""
        if filter not in self._filtered:
            if self._filters is None:
                self._filters = FilterIndex(item for shard in self.store.shards for item in shard.metadata_items())
            if len(self._filtered) >= FILTERS_KEPT:
                self._filtered.pop(next(iter(self._filtered)))
            self._filtered[filter] = self.restrict(self._filters.allowed(filter))
        return self._filtered[filter]

    def restrict(self, ids: np.ndarray) -> CodeIndex:
        """A flat index over the items among `ids` (sorted; absent ones are skipped): a filtered search scans
        exactly the items that pass, as a brute force over them would."""
        found_ids, found_codes = [], []
        for shard, rows in zip(self.store.shards, self.store.by_shard(ids)):
            shard.sync_index()
            positions, missing = find_sorted(shard.code_index.ids, ids[rows])
            found_ids.append(ids[rows][~missing])
            found_codes.append(shard.code_index.codes[positions[~missing]])
        ids, codes = np.concatenate(found_ids), np.concatenate(found_codes)
        order = np.argsort(ids, kind="stable")  # id order: ties come out broken by id
        codes = np.ascontiguousarray(codes[order])
        return CodeIndex(ids[order], codes, index_type("flat"))
