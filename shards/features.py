"""How a catalog reads stored feature rows for the re-ranking stage: located by arithmetic, gathered from LMDB's
memory map, checked against each item's checksum, and compared with a query by Faiss on the bytes as stored."""
from __future__ import annotations

import faiss
import numpy as np

from shards.errors import DamagedError, InvalidArgumentError
from shards.index import find_sorted
from shards.records import row_checksums
from shards.shard import gather_rows
from shards.shard_set import ShardSet


class FeatureRows:
    """The feature rows of `store`'s shards; a reader keeps a locator per snapshot (`forget` after a refresh)."""

    def __init__(self, store: ShardSet):
        self.store = store
        self.layout = store.manifest.layout
        self._fp16 = faiss.ScalarQuantizer(self.layout.feature_dim, faiss.ScalarQuantizer.QT_fp16)
        self._locator: tuple[np.ndarray, np.ndarray] | None = None

    def forget(self) -> None:
        """After a refresh or a write: the locator describes the snapshot it was built from."""
        self._locator = None

    def decode(self, raw: bytes | np.ndarray, n: int) -> np.ndarray:
        """Stored feature bytes of n items to float32; Faiss's SIMD fp16 decoder is ~3x faster than numpy's."""
        array = np.frombuffer(raw, dtype=np.uint8).reshape(n, self.layout.feature_bytes)
        if self.layout.feature_dtype == "float16":
            return self._fp16.decode(array)
        return array.view(np.float32).copy()

    def squared_distances(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Squared L2 from one float32 query to stored feature rows, computed by Faiss on the stored bytes as
        they are (its SIMD fp16 path): ~2.5x faster than decoding to float32 and subtracting in numpy."""
        d = self.layout.feature_dim
        if self.layout.feature_dtype == "float16":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        else:
            index = faiss.IndexFlatL2(d)
        faiss.copy_array_to_vector(rows.reshape(-1), index.codes)
        index.ntotal = len(rows)
        distances, positions = index.search(query[None], len(rows))
        squared = np.full(len(rows), np.inf, np.float32)  # a row Faiss leaves unplaced (not finite) is no match
        placed = positions[0] >= 0
        squared[positions[0][placed]] = distances[0][placed]
        return squared

    def rows(self, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Stored feature bytes of the given ids, (n, feature_bytes) uint8, read straight from LMDB. `positions`:
        the ids' places in the catalog's id order if known (from the coarse stage), else they are looked up."""
        width = self.layout.feature_bytes
        if self.store.readonly:
            known, addresses = self._located()
            if positions is None or len(ids) and (positions.max() >= len(known)
                                                  or not np.array_equal(known[positions], ids)):
                positions, missing = find_sorted(known, ids)
                if missing.any():
                    raise InvalidArgumentError(f"{self.store.path}: ids not in the catalog: "
                                               f"{ids[missing][:10].tolist()}")
            return gather_rows(addresses[positions], width)
        rows = np.empty((len(ids), width), np.uint8)
        for shard, positions in zip(self.store.shards, self.store.by_shard(ids)):
            if len(positions):
                try:
                    rows[positions] = shard.feature_rows(ids[positions])
                except KeyError as error:
                    raise InvalidArgumentError(f"{self.store.path}: ids not in the catalog: "
                                               f"{error.args[0][:10]}") from None
        return rows

    def _located(self) -> tuple[np.ndarray, np.ndarray]:
        """A reader's (every id sorted, where its feature row lies in memory): one search and one gather find
        the rows of a candidate pool across all shards. Built once per snapshot (~0.1 s per million items)."""
        if self._locator is None:
            ids, order = self.store.ids_in_order()
            addresses = np.concatenate([shard.feature_addresses() for shard in self.store.shards])
            self._locator = ids, addresses[order]
        return self._locator

    def check(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Raise if a stored feature row, or the code searched for it, no longer matches the item's checksum."""
        expected = np.empty(len(ids), np.uint32)
        codes = np.empty((len(ids), self.layout.code_bytes), np.uint8)
        for shard, positions in zip(self.store.shards, self.store.by_shard(ids)):
            if len(positions):
                codes[positions], expected[positions] = shard.checksums(ids[positions])
        bad = ids[row_checksums(codes, rows) != expected]
        if len(bad):
            shard = next(s for s in self.store.shards if s.number == int(bad[0]) % self.store.manifest.shard_count)
            raise DamagedError(f"{shard.data_file}: items {bad[:10].tolist()} are damaged (checksum mismatch); "
                               "engine.verify names every damaged item and repairs the catalog")

    def check_finite(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Raise if a stored feature row is not finite (an older version stored float16 overflow as inf, under a
        valid checksum): ranking it would put garbage among the results."""
        bad = ids[~np.isfinite(self.decode(rows, len(ids))).all(axis=1)]
        if len(bad):
            raise DamagedError(f"{self.store.path}: items {bad[:10].tolist()} have features that are not finite; "
                               "engine.verify names every such item and a repair deletes them")

    def read(self, ids: np.ndarray) -> np.ndarray:
        """float32 features of the given (checked) ids, checked against their checksums."""
        rows = self.rows(ids)
        self.check(ids, rows)
        return self.decode(rows, len(ids))
