"""The writing side of an in-process catalog: batches added all-or-nothing across shards (with the journal),
deletes, flushes that store the search indices, and the rebuild a repair asks for. One writer at a time: it holds
the catalog's writer lock from open to close."""
from __future__ import annotations

from typing import IO, Sequence

import msgpack
import numpy as np

from shards.errors import DuplicateIdError, InvalidArgumentError
from shards.files import commit_lock, release_writer_lock
from shards.shard_set import ShardSet

_pack = msgpack.Packer(use_bin_type=True).pack  # metadata format: msgpack, ~10x faster than json here


class CatalogWriter:
    """Writes to `store`'s shards while holding `lock_file` (the writer lock, released by `release`)."""

    def __init__(self, store: ShardSet, lock_file: IO):
        self.store, self.journal, self.lock_file = store, store.journal, lock_file

    def add(self, ids: Sequence[int] | np.ndarray, codes: np.ndarray, features: np.ndarray,
            metas: Sequence[dict] | None = None) -> None:
        """Add a batch: all of it or none, across shards, even if the process is killed midway."""
        store = self.store
        ids = store.check_ids(ids)
        store.check_held(ids)
        codes = store.check_codes(codes)
        features = self._stored_features(ids, store.check_features(features, len(ids)))
        if len(codes) != len(ids) or (metas is not None and len(metas) != len(ids)):
            raise InvalidArgumentError(f"{store.path}: ids, codes, features and metadata must have the same length")
        if len(np.unique(ids)) != len(ids):
            raise DuplicateIdError(f"{store.path}: the batch names an id twice")
        encoded = [self._pack_meta(item, m) for item, m in zip(ids, metas)] if metas is not None else None
        parts = [(shard, rows) for shard, rows in zip(store.shards, store.by_shard(ids)) if len(rows)]
        for shard, rows in parts:  # refuse before anything is written: no partial batch on a duplicate
            present = [int(ids[r]) for r, code in zip(rows, shard.codes(ids[rows])) if code is not None]
            if present:
                raise DuplicateIdError(f"{shard.path}: ids already in the catalog: {present[:10]}")
        self.journal.write(ids)
        with commit_lock(store.path, exclusive=True):
            try:
                for shard, rows in parts:
                    shard.add(ids[rows], codes[rows], features[rows],
                              [encoded[r] for r in rows] if encoded is not None else None)
            except BaseException:  # a shard's commit failed (a full disk): undo the shards that committed
                self.journal.roll_back()  # if this fails too, the journal stays for the next open
                raise
            self.journal.remove()

    def _stored_features(self, ids: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Features as the catalog stores them, refused where that type cannot hold them (1e6 is inf in float16,
        and an inf row ranks at random)."""
        dtype = self.store.manifest.feature_dtype
        with np.errstate(over="ignore"):  # the overflow is what is checked
            stored = features.astype(dtype, copy=False)
        overflow = ~np.isfinite(stored).all(axis=1)
        if overflow.any():
            raise InvalidArgumentError(f"{self.store.path}: features of items {ids[overflow][:10].tolist()} do not "
                                       f"fit {dtype} (magnitudes up to {np.finfo(dtype).max:g})")
        return stored

    def _pack_meta(self, item: int, meta: dict) -> bytes:
        try:
            return _pack(meta)
        except (TypeError, ValueError, UnicodeEncodeError, OverflowError) as error:
            raise InvalidArgumentError(f"{self.store.path}: metadata of item {int(item)} cannot be stored "
                                       f"({error})") from None

    def delete(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete items (absent ids are ignored); returns how many were removed."""
        ids = self.store.check_ids(ids)
        self.store.check_held(ids)
        with commit_lock(self.store.path, exclusive=True):
            return sum(shard.delete(ids[rows]) for shard, rows in zip(self.store.shards, self.store.by_shard(ids))
                       if len(rows))

    def flush(self) -> None:
        """Store the shards' search indices (the next open needs no rebuild) and the item counts."""
        with commit_lock(self.store.path, exclusive=True):  # readers open shards under the shared lock
            for shard in self.store.shards:
                shard.flush()
        self.store.record_counts()

    def rebuild_indices(self) -> None:
        """Rebuild every shard's search index from its item records and store it (a repair)."""
        for shard in self.store.shards:
            shard.rebuild_index()

    def release(self) -> None:
        release_writer_lock(self.lock_file)
