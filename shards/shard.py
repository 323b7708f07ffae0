"""One shard: its LMDB records (`shards.records`) and the in-memory index over them, kept in step with every
write and stored beside the records.

In memory a shard keeps a CodeIndex (ids sorted, padded codes in the same order, the Faiss index over them) and
the feature slots and checksums in that order. The serialized index is stored beside the items with the
generation it reflects and a checksum; opening a shard whose stored index is missing, stale or damaged rebuilds
it from the items. The counters kept beside the records are checked against their bounds and against the feature
blocks on every open: a damaged one is refused in one line (a repair by `engine.verify` rewrites it from the
records), never trusted to size an allocation or the next write.
"""
from __future__ import annotations

import ctypes
import os
import zlib
from typing import Iterator

import faiss
import lmdb
import numpy as np

from shards.codes import pad_codes
from shards.errors import CatalogError, DamagedError
from shards.index import CodeIndex, find_sorted, index_type
from shards.records import (CHECKSUM_BYTES, MAX_COUNTER, SLOT_BYTES, ShardLayout, ShardRecords, id_keys,
                            keys_to_ids, row_checksums, whole_number)


class Shard(ShardRecords):
    def __init__(self, path: str | os.PathLike, layout: ShardLayout, readonly: bool = True,
                 number: int = 0, count: int = 1, writer_may_join: bool = False, create: bool = False,
                 repair: bool = False):
        """`writer_may_join`: a reader whose process may later open a writer on this shard too (LMDB allows one
        environment per file per process, so the reader opens it writable; it still writes nothing).
        `create` (writers): the data file may be made; without it a missing one is refused, as LMDB would
        silently start an empty shard in its place. `repair` (writers): counters that disagree with the stored
        records are rewritten from them instead of refused; what was wrong is kept in `repairs`."""
        self._block_map: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        super().__init__(path, layout, readonly, number, count, writer_may_join, create, repair)
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    def refresh(self) -> None:
        """(Re)load the in-memory index; a reader takes a new snapshot and from then on sees what it saw."""
        self._block_map = None
        self._hidden = frozenset()
        if self._snapshot is not None:
            self._snapshot.abort()
        if self.readonly:
            try:
                self._snapshot = self.env.begin(buffers=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
                self._snapshot = self.env.begin(buffers=True)
        with self._read() as txn:
            self._load(txn)
            if self.readonly:  # LMDB keeps a snapshot's pages in place while it is open: their addresses hold
                self._block_map = self._locate_blocks(txn)


    _INDEX_BLOBS = (b"ids", b"slots", b"sums", b"codes", b"index")

    def _load(self, txn: lmdb.Transaction) -> None:
        self._pending = []
        problems = self._counter_problems(txn)
        if problems:
            raise DamagedError(f"{problems[0]}; a repair by engine.verify rewrites it from the records")
        self.generation = self._counter(txn, b"generation")
        self.index_problem: str | None = None  # a stored index found damaged (rebuilt here; `verify` reports it)
        self.index_loaded_from_disk = self._load_stored_index(txn)
        if not self.index_loaded_from_disk:
            self._rebuild_from_items(txn)

    def _load_stored_index(self, txn: lmdb.Transaction) -> bool:
        """Use the stored index if it reflects the current generation; one found damaged sets `index_problem`."""
        stored, checksum = (txn.get(key, db=self._info) for key in (b"index_generation", b"index_checksum"))
        blobs = [txn.get(name, db=self._info) for name in self._INDEX_BLOBS]
        if stored is None or checksum is None or None in blobs:
            return False  # never stored
        generation, crc = whole_number(stored, MAX_COUNTER), whole_number(checksum, 2**32 - 1)
        if generation is None or crc is None:
            self.index_problem = (f"its stored search index has damaged bookkeeping (index_generation "
                                  f"{bytes(stored)!r}, index_checksum {bytes(checksum)!r})")
            return False
        if generation != self.generation:
            return False  # stale: written before the last add or delete (a writer killed before it flushed)
        if crc != _crc(blobs):
            self.index_problem = "its stored search index is damaged (checksum mismatch)"
            return False
        try:
            ids, slots, sums = (np.frombuffer(b, dtype=t).copy() for b, t in zip(blobs, (np.int64, np.int64,
                                                                                        np.uint32)))
            codes = np.frombuffer(blobs[3], dtype=np.uint8).reshape(-1, self.layout.padded_bytes).copy()
            index = faiss.deserialize_index_binary(np.frombuffer(blobs[4], np.uint8))
            kind = index_type(self.layout.index_type)
            if (len(ids) == len(slots) == len(sums) == len(codes) == index.ntotal == txn.stat(self._items)["entries"]
                    and index.d == self.layout.padded_bytes * 8 and type(index).__name__ == kind.faiss_class):
                self.code_index = CodeIndex(ids, codes, kind, index)
                self.slots, self.sums = slots, sums
                return True
        except (TypeError, ValueError, RuntimeError):
            pass
        self.index_problem = "its stored search index does not match its items"
        return False


    def _rebuild_from_items(self, txn: lmdb.Transaction) -> None:
        keys, values = [], []
        for key, value in txn.cursor(db=self._items):
            keys.append(key)
            values.append(value)
        if any(len(v) != self.layout.item_bytes for v in values):
            raise DamagedError(f"{self.data_file}: item records of the wrong size; engine.verify lists them")
        ids = keys_to_ids(keys) if keys else np.empty(0, dtype=np.int64)
        slots, packed, sums = _split_items(b"".join(values), len(keys), self.layout.code_bytes)
        self._set_index(ids, pad_codes(packed, self.layout.bits), slots, sums)

    def _set_index(self, ids: np.ndarray, padded: np.ndarray, slots: np.ndarray, sums: np.ndarray) -> None:
        layout = self.layout
        order = np.argsort(ids, kind="stable")  # id order: ties come out broken by id (see shards.index)
        padded = np.ascontiguousarray(padded[order])
        self.code_index = CodeIndex(ids[order], padded, index_type(layout.index_type), hash_bits=layout.hash_bits,
                                    previous=getattr(self, "code_index", None))
        self.slots, self.sums = slots[order], sums[order]


    def sync_index(self, dropped: np.ndarray | None = None) -> None:
        """Fold adds made since the last search, and drop the ids `dropped`, into the sorted arrays and the
        Faiss index, rebuilding it once and only if something changed (not thread-safe: the catalog calls it
        before it fans out)."""
        if not self._pending and dropped is None:
            return  # the search path: nothing to fold
        columns = [np.concatenate([old] + [p[n] for p in self._pending])
                   for n, old in enumerate((self.code_index.ids, self.code_index.codes, self.slots, self.sums))]
        keep = ~np.isin(columns[0], dropped) if dropped is not None else np.ones(len(columns[0]), bool)
        if self._pending or not keep.all():
            self._pending = []
            self._set_index(*(column[keep] for column in columns))

    def flush(self) -> None:
        """Store the index with the generation it reflects, so the next open needs no rebuild."""
        self._require_writer()
        self.sync_index()
        blobs = [self.code_index.ids.tobytes(), self.slots.tobytes(), self.sums.tobytes(),
                 self.code_index.codes.tobytes(), faiss.serialize_index_binary(self.code_index.index).tobytes()]

        def store(txn: lmdb.Transaction) -> None:
            if self._counter(txn, b"generation") != self.generation:
                raise CatalogError(f"{self.data_file}: changed by another writer")
            for name, blob in zip(self._INDEX_BLOBS, blobs):
                txn.put(name, blob, db=self._info)
            txn.put(b"index_checksum", str(_crc(blobs)).encode(), db=self._info)
            txn.put(b"index_generation", str(self.generation).encode(), db=self._info)

        self._write(store)
        try:
            self.env.sync(True)  # commits skip fsync (safe against process crashes); a flush makes them durable
        except lmdb.Error as error:
            raise CatalogError(f"{self.data_file}: could not be written to disk ({error})") from error

    def close(self) -> None:
        self._block_map = None
        super().close()

    def add(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray, metas: list[bytes] | None) -> None:
        """Add one batch in one transaction: all of it is committed, or none. Inputs are validated upstream."""
        sums = row_checksums(codes, features)
        self.generation, slots = self._put_items(ids, codes, features, sums, metas)
        self._pending.append((np.asarray(ids, dtype=np.int64), pad_codes(codes, self.layout.bits), slots, sums))

    def delete(self, ids: np.ndarray) -> int:
        """Delete ids (absent ones are ignored) in one transaction; returns how many were present. Their
        feature slots are not reused: a catalog that deletes much can be compacted by export and import."""
        removed, self.generation = self._delete_items(ids)
        self.sync_index(dropped=np.asarray(ids, dtype=np.int64))
        return removed

    def __len__(self) -> int:
        return len(self.code_index) + sum(len(p[0]) for p in self._pending)

    def slots_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a mask of the ids this shard holds, their feature slots; 0 where absent), from the in-memory index."""
        self.sync_index()
        positions, missing = find_sorted(self.code_index.ids, ids)
        slots = self.slots[positions] if len(self.slots) else np.zeros(len(ids), np.int64)
        return ~missing, np.where(missing, 0, slots)

    def hide(self, ids: np.ndarray) -> None:
        """A reader leaves these items out of everything it answers until its next refresh: the part a killed
        writer committed of a batch, which the next writer rolls back."""
        self._hidden = frozenset(id_keys(ids))
        self.sync_index(dropped=np.asarray(ids, np.int64))

    def checksums(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packed codes, stored checksums) of `ids` from the in-memory index; raises KeyError for absent ids."""
        self.sync_index()
        positions, missing = find_sorted(self.code_index.ids, ids)
        if missing.any():
            raise KeyError([int(i) for i in ids[missing]])
        return self.code_index.codes[positions, :self.layout.code_bytes], self.sums[positions]

    def feature_rows(self, ids: np.ndarray) -> np.ndarray:
        """(n, feature_bytes) uint8 stored features of `ids`, which must all be present; raises KeyError if not.
        Reads only these rows: slot -> block address + offset, one vectorised gather."""
        self.sync_index()
        positions, missing = find_sorted(self.code_index.ids, ids)
        if missing.any():
            raise KeyError([int(i) for i in ids[missing]])
        slots = self.slots[positions]
        if self._block_map is not None:
            return gather_rows(self._addresses(self._block_map, slots), self.layout.feature_bytes)
        with self._read() as txn:  # the writer: locate the blocks for this read only, copy before it ends
            return gather_rows(self._addresses(self._locate_blocks(txn), slots), self.layout.feature_bytes)

    def feature_addresses(self) -> np.ndarray:
        """A reader's memory address of every item's feature row, in code_index order (valid until refresh)."""
        if self._block_map is None:
            raise CatalogError(f"{self.path}: feature addresses are for readers (open the catalog read-only)")
        return self._addresses(self._block_map, self.slots)

    def _addresses(self, block_map: tuple[np.ndarray, np.ndarray], slots: np.ndarray) -> np.ndarray:
        addresses, lengths = block_map
        width = self.layout.feature_bytes
        blocks, offsets = np.divmod(slots, self.layout.block_items)
        if np.any(blocks >= len(addresses)) or np.any(lengths[blocks] < (offsets + 1) * width):
            raise DamagedError(f"{self.data_file}: feature blocks are damaged or missing")
        return addresses[blocks] + offsets * width

    def iterate(self) -> Iterator[tuple[int, bytes, bytes, dict | None]]:
        """(id, code, feature bytes, metadata) in id order, from one consistent transaction."""
        for item_id, code, row, meta, problem in self.scan():
            if problem is not None:
                raise DamagedError(f"{self.data_file}: item {item_id}: {problem}; engine.verify lists every "
                                   "damaged item")
            yield item_id, code, row, meta

    def verify(self) -> Iterator[tuple[int | None, str]]:
        """(item id or None for the shard itself, what is wrong) for every damaged item, and for a search index
        that disagrees with the items (it would then give wrong answers until rebuilt)."""
        if self.index_problem is not None:
            yield None, f"{self.index_problem}; rebuilt from the items in memory, a repair stores it again"
        ids, codes = [], []
        for item_id, code, _, _, problem in self.scan():
            if problem is not None:
                yield item_id, problem
            ids.append(item_id)
            codes.append(code)
        self.sync_index()
        width = self.layout.code_bytes
        indexed = self.code_index
        if not np.array_equal(indexed.ids, np.array(ids, np.int64)):
            yield None, f"search index holds {len(indexed.ids)} ids, the items {len(ids)}; a repair rebuilds it"
        elif ids and indexed.codes[:, :width].tobytes() != b"".join(codes):
            yield None, "search index codes differ from the item records; a repair rebuilds it"

    def rebuild_index(self) -> None:
        """Rebuild the search index from the item records and store it (writers)."""
        self._require_writer()
        with self._read() as txn:
            self._rebuild_from_items(txn)
        self.flush()


def _crc(blobs: list) -> int:
    checksum = 0
    for blob in blobs:
        checksum = zlib.crc32(blob, checksum)
    return checksum


def _split_items(raw: bytes, n: int, code_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item values (8-byte big-endian slot + packed code + 4-byte checksum) -> (slots, codes, checksums)."""
    table = np.frombuffer(raw, dtype=np.uint8).reshape(n, SLOT_BYTES + code_width + CHECKSUM_BYTES)
    slots = np.ascontiguousarray(table[:, :SLOT_BYTES]).view(">u8").reshape(-1).astype(np.int64)
    sums = np.ascontiguousarray(table[:, -CHECKSUM_BYTES:]).view(">u4").reshape(-1).astype(np.uint32)
    return slots, np.ascontiguousarray(table[:, SLOT_BYTES:SLOT_BYTES + code_width]), sums


def gather_rows(addresses: np.ndarray, width: int) -> np.ndarray:
    """Copy `width` bytes from each address (each inside a live LMDB memory map) into an (n, width) array.
    The strided view spans the addresses without touching anything but the rows it copies."""
    if len(addresses) == 0:
        return np.empty((0, width), np.uint8)
    low = int(addresses.min())
    span = int(addresses.max()) - low + width
    memory = np.frombuffer((ctypes.c_uint8 * span).from_address(low), np.uint8)
    rows = np.lib.stride_tricks.as_strided(memory, shape=(span - width + 1, width), strides=(1, 1), writeable=False)
    return rows[addresses - low]


