"""One shard: an LMDB environment holding items (code + feature slot), feature blocks, metadata and a Faiss
binary index.

An item's features live in a numbered slot; slots are packed BLOCK_BYTES to an LMDB value ("feature block"), so
the re-ranking stage finds a candidate's features by arithmetic instead of a B-tree lookup (~3 us each on a large
file). In memory a shard keeps a CodeIndex (ids sorted, padded codes in the same order, the Faiss index over them)
and the slots in that order. The serialized index is stored beside the items with the generation it reflects;
opening a shard whose stored index is missing, stale or damaged rebuilds it from the items.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import lmdb
import msgpack
import numpy as np

from shards.codes import code_bytes, pad_codes, padded_bytes
from shards.errors import CatalogError, DuplicateIdError
from shards.index import CodeIndex, find_sorted, make_faiss_index

INITIAL_MAP_SIZE = 64 << 30  # address space only: the file grows as pages are used
BLOCK_BYTES = 256 << 10  # a feature block's default size: few blocks to locate, cheap to rewrite the last
SLOT_BYTES = 8
FEATURE_DTYPES = ("float16", "float32")
INDEX_TYPES = ("flat", "hash")


@dataclass(frozen=True)
class ShardLayout:
    """What every record of a shard looks like, and which index serves it."""

    bits: int
    feature_dim: int
    feature_dtype: str = "float16"
    index_type: str = "flat"
    hash_bits: int = 16
    block_items: int = 1024

    @property
    def code_bytes(self) -> int:
        return code_bytes(self.bits)

    @property
    def padded_bytes(self) -> int:
        return padded_bytes(self.bits)

    @property
    def feature_bytes(self) -> int:
        return self.feature_dim * np.dtype(self.feature_dtype).itemsize


def id_keys(ids: np.ndarray) -> list[bytes]:
    """8-byte big-endian keys (of ids or block numbers), so LMDB's byte order is numeric order."""
    raw = np.asarray(ids, dtype=">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _rows(array: np.ndarray) -> list[memoryview]:
    """Zero-copy per-row byte views of a 2-D array, for LMDB's putmulti."""
    width = array.shape[1] * array.itemsize
    flat = memoryview(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return [flat[i * width:(i + 1) * width] for i in range(len(array))]


def _keys_to_ids(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=">u8").astype(np.int64)


_ENVIRONMENTS: dict[str, list] = {}  # real path -> [environment, users, readonly, databases]
_DATABASES = (b"items", b"feature_blocks", b"meta", b"info")
_ENVIRONMENTS_LOCK = threading.Lock()


def _open_env(path: Path, readonly: bool) -> tuple[lmdb.Environment, list]:
    """One LMDB environment per file per process (LMDB forbids two), shared by every shard object on it, with
    its named databases opened once (py-lmdb's open_db can block holding the GIL: never under contention)."""
    key = os.path.realpath(path)
    with _ENVIRONMENTS_LOCK:
        entry = _ENVIRONMENTS.get(key)
        if entry is not None:
            if entry[2] and not readonly:
                raise CatalogError(f"{path}: already open read-only in this process; open the writer first")
            entry[1] += 1
            return entry[0], entry[3]
        try:
            env = lmdb.open(str(path), max_dbs=4, map_size=INITIAL_MAP_SIZE, readonly=readonly, readahead=False,
                            meminit=False, max_readers=512, sync=False)
        except lmdb.Error as error:
            raise CatalogError(f"{path / 'data.mdb'}: not a readable LMDB file ({error})") from error
        _check_not_truncated(env, path / "data.mdb")
        try:
            databases = [env.open_db(name, create=not readonly) for name in _DATABASES]
        except lmdb.Error as error:
            env.close()
            raise CatalogError(f"{path / 'data.mdb'}: damaged or not a latenthash shard ({error})") from error
        _ENVIRONMENTS[key] = [env, 1, readonly, databases]
        return env, databases


def _close_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _ENVIRONMENTS_LOCK:
        entry = _ENVIRONMENTS[key]
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _ENVIRONMENTS[key]


def _check_not_truncated(env: lmdb.Environment, data_file: Path) -> None:
    """A data file shorter than its own last page would SIGBUS on access: refuse it instead."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data_file.stat().st_size
    if size < needed:
        env.close()
        raise CatalogError(f"{data_file}: truncated ({size} bytes, its pages need {needed})")


class Shard:
    def __init__(self, path: str | os.PathLike, layout: ShardLayout, readonly: bool = True):
        self.path = Path(path)
        self.layout = layout
        self.readonly = readonly
        self.data_file = self.path / "data.mdb"
        if readonly and not self.data_file.is_file():
            raise CatalogError(f"{self.data_file}: shard data file is missing")
        self.path.mkdir(parents=True, exist_ok=True)
        self.env, databases = _open_env(self.path, readonly)
        self._items, self._blocks, self._meta, self._info = databases
        self._snapshot: lmdb.Transaction | None = None
        self._block_map: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.refresh()

    # ------------------------------------------------------------------ opening and persistence

    def refresh(self) -> None:
        """(Re)load the in-memory index; a reader takes a new snapshot and from then on sees what it saw."""
        self._block_map = None
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

    def _read(self) -> Any:
        """The reader's snapshot, or a fresh read transaction for the writer (usable with `with`); values come
        back as memoryviews into LMDB's map, valid until the transaction ends."""
        if self._snapshot is not None:
            return _Borrowed(self._snapshot)
        return self.env.begin(buffers=True)

    def _load(self, txn: lmdb.Transaction) -> None:
        self._pending = []
        self.generation = int(bytes(txn.get(b"generation", db=self._info) or b"0"))
        entries = txn.stat(self._items)["entries"]
        stored = txn.get(b"index_generation", db=self._info)
        if stored is not None and int(bytes(stored)) == self.generation:
            try:
                ids = np.frombuffer(txn.get(b"ids", db=self._info), dtype=np.int64).copy()
                slots = np.frombuffer(txn.get(b"slots", db=self._info), dtype=np.int64).copy()
                codes = np.frombuffer(txn.get(b"codes", db=self._info), dtype=np.uint8)
                codes = codes.reshape(-1, self.layout.padded_bytes).copy()
                index = faiss.deserialize_index_binary(np.frombuffer(txn.get(b"index", db=self._info), np.uint8))
                if (len(ids) == len(slots) == len(codes) == index.ntotal == entries
                        and index.d == self.layout.padded_bytes * 8):
                    self.code_index, self.slots = CodeIndex(ids, codes, index), slots
                    self.index_loaded_from_disk = True
                    return
            except (TypeError, ValueError, RuntimeError):
                pass  # damaged: rebuild below
        self._rebuild_from_items(txn)
        self.index_loaded_from_disk = False

    def _rebuild_from_items(self, txn: lmdb.Transaction) -> None:
        keys, values = [], []
        for key, value in txn.cursor(db=self._items):
            keys.append(key)
            values.append(value)
        ids = _keys_to_ids(keys) if keys else np.empty(0, dtype=np.int64)
        slots, packed = _split_items(b"".join(values), len(keys), self.layout.code_bytes)
        self._set_index(ids, pad_codes(packed, self.layout.bits), slots)

    def _set_index(self, ids: np.ndarray, padded: np.ndarray, slots: np.ndarray) -> None:
        layout = self.layout
        order = np.argsort(ids, kind="stable")  # id order: ties come out broken by id (see shards.index)
        padded = np.ascontiguousarray(padded[order])
        self.code_index = CodeIndex(ids[order], padded,
                                    make_faiss_index(layout.index_type, layout.bits, layout.hash_bits, padded))
        self.slots = slots[order]

    def _locate_blocks(self, txn: lmdb.Transaction) -> tuple[np.ndarray, np.ndarray]:
        """(address in memory, length in bytes) of every feature block, indexed by block number."""
        count = int(bytes(txn.get(b"blocks", db=self._info) or b"0"))
        addresses, lengths = np.zeros(count, np.int64), np.zeros(count, np.int64)
        for key, value in txn.cursor(db=self._blocks):
            block = int.from_bytes(key, "big")
            if block < count:
                addresses[block], lengths[block] = np.frombuffer(value, np.uint8).ctypes.data, len(value)
        return addresses, lengths

    def sync_index(self, dropped: np.ndarray | None = None) -> None:
        """Fold adds made since the last search, and drop the ids `dropped`, into the sorted arrays and the
        Faiss index, rebuilding it once and only if something changed (not thread-safe: the catalog calls it
        before it fans out)."""
        if not self._pending and dropped is None:
            return  # the search path: nothing to fold
        ids = np.concatenate([self.code_index.ids] + [p[0] for p in self._pending])
        codes = np.concatenate([self.code_index.codes] + [p[1] for p in self._pending])
        slots = np.concatenate([self.slots] + [p[2] for p in self._pending])
        keep = ~np.isin(ids, dropped) if dropped is not None else np.ones(len(ids), bool)
        if self._pending or not keep.all():
            self._pending = []
            self._set_index(ids[keep], codes[keep], slots[keep])

    def flush(self) -> None:
        """Store the index with the generation it reflects, so the next open needs no rebuild."""
        self._require_writer()
        self.sync_index()
        index_blob = faiss.serialize_index_binary(self.code_index.index).tobytes()

        def store(txn: lmdb.Transaction) -> None:
            if int(txn.get(b"generation", db=self._info) or b"0") != self.generation:
                raise CatalogError(f"{self.data_file}: changed by another writer")
            txn.put(b"index", index_blob, db=self._info)
            txn.put(b"ids", self.code_index.ids.tobytes(), db=self._info)
            txn.put(b"slots", self.slots.tobytes(), db=self._info)
            txn.put(b"codes", self.code_index.codes.tobytes(), db=self._info)
            txn.put(b"index_generation", str(self.generation).encode(), db=self._info)

        self._write(store)
        self.env.sync(True)  # commits skip fsync (safe against process crashes); a flush makes them durable

    def close(self) -> None:
        self._block_map = None
        if self._snapshot is not None:
            self._snapshot.abort()
            self._snapshot = None
        _close_env(self.path)

    # ------------------------------------------------------------------ writes
    def _require_writer(self) -> None:
        if self.readonly:
            raise CatalogError(f"{self.path}: opened read-only")

    def _write(self, body: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run `body` in one write transaction, doubling the map size and retrying while LMDB is full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                try:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.Error as error:
                    raise CatalogError(f"{self.data_file}: map full and cannot grow while readers of this "
                                       f"process hold snapshots; refresh or close them ({error})") from error

    def _bump_generation(self, txn: lmdb.Transaction) -> int:
        generation = int(txn.get(b"generation", db=self._info) or b"0") + 1
        txn.put(b"generation", str(generation).encode(), db=self._info)
        return generation

    def _put_features(self, txn: lmdb.Transaction, first_slot: int, features: np.ndarray) -> int:
        """Write feature rows into slots first_slot.. (appending to a partly filled last block); returns the
        block count after it."""
        per_block, width = self.layout.block_items, self.layout.feature_bytes
        raw = np.ascontiguousarray(features).view(np.uint8).reshape(-1)
        block, offset = divmod(first_slot, per_block)
        start = 0
        if offset:
            key = id_keys([block])[0]
            head = txn.get(key, db=self._blocks) or b""
            if len(head) != offset * width:
                raise CatalogError(f"{self.data_file}: feature block {block} is damaged "
                                   f"({len(head)} bytes, expected {offset * width})")
            start = min(per_block - offset, len(features)) * width
            txn.put(key, head + raw[:start].tobytes(), db=self._blocks)
            block += 1
        chunks = range(start, len(raw), per_block * width)
        txn.cursor(db=self._blocks).putmulti(
            zip(id_keys(np.arange(block, block + len(chunks))), (memoryview(raw[c:c + per_block * width]) for c in chunks)))
        return -(-(first_slot + len(features)) // per_block)

    def add(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray, metas: list[bytes] | None) -> None:
        """Add one batch in one transaction: all of it is committed, or none. Inputs are validated upstream."""
        self._require_writer()
        keys = id_keys(ids)

        def put(txn: lmdb.Transaction) -> tuple[int, np.ndarray]:
            first = int(txn.get(b"slots_used", db=self._info) or b"0")
            slots = np.arange(first, first + len(ids), dtype=np.int64)
            values = np.concatenate([slots.astype(">u8").view(np.uint8).reshape(-1, SLOT_BYTES), codes], axis=1)
            consumed, added = txn.cursor(db=self._items).putmulti(zip(keys, _rows(values)), overwrite=False)
            if added != len(keys):
                present = [int(i) for i, k in zip(ids, keys) if txn.get(k, db=self._items) is not None]
                raise DuplicateIdError(f"{self.path}: ids already in the catalog: {present[:10]}")
            blocks = self._put_features(txn, first, features)
            txn.put(b"slots_used", str(first + len(ids)).encode(), db=self._info)
            txn.put(b"blocks", str(blocks).encode(), db=self._info)
            if metas is not None:
                txn.cursor(db=self._meta).putmulti(zip(keys, metas))
            return self._bump_generation(txn), slots

        self.generation, slots = self._write(put)
        self._pending.append((np.asarray(ids, dtype=np.int64), pad_codes(codes, self.layout.bits), slots))

    def delete(self, ids: np.ndarray) -> int:
        """Delete ids (absent ones are ignored) in one transaction; returns how many were present. Their
        feature slots are not reused: a catalog that deletes much can be compacted by export and import."""
        self._require_writer()
        keys = id_keys(ids)

        def remove(txn: lmdb.Transaction) -> tuple[int, int]:
            removed = sum(txn.delete(k, db=self._items) for k in keys)
            for k in keys:
                txn.delete(k, db=self._meta)
            return removed, self._bump_generation(txn)

        removed, self.generation = self._write(remove)
        self.sync_index(dropped=np.asarray(ids, dtype=np.int64))
        return removed

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self.code_index) + sum(len(p[0]) for p in self._pending)

    def _get(self, ids: np.ndarray, db: Any) -> list[bytes | None]:
        keys = id_keys(ids)
        with self._read() as txn:
            found = {bytes(k): bytes(v) for k, v in txn.cursor(db=db).getmulti(keys)}
        return [found.get(k) for k in keys]

    def codes(self, ids: np.ndarray) -> list[bytes | None]:
        """Packed codes of `ids` (None where absent)."""
        return [v[SLOT_BYTES:] if v is not None else None for v in self._get(ids, self._items)]

    def metas(self, ids: np.ndarray) -> list[dict | None]:
        return [msgpack.unpackb(r) if r is not None else None for r in self._get(ids, self._meta)]

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
            raise CatalogError(f"{self.data_file}: feature blocks are damaged or missing")
        return addresses[blocks] + offsets * width

    def iterate(self) -> Iterator[tuple[int, bytes, bytes, dict | None]]:
        """(id, code, feature bytes, metadata) in id order, from one consistent transaction."""
        per_block, width = self.layout.block_items, self.layout.feature_bytes
        with self._read() as txn:
            blocks, metas = txn.cursor(db=self._blocks), txn.cursor(db=self._meta)
            for key, value in txn.cursor(db=self._items):
                block, offset = divmod(int.from_bytes(value[:SLOT_BYTES], "big"), per_block)
                row = blocks.get(id_keys([block])[0])[offset * width:(offset + 1) * width]
                meta = metas.get(key)
                yield (int.from_bytes(key, "big"), bytes(value[SLOT_BYTES:]), bytes(row),
                       msgpack.unpackb(meta) if meta is not None else None)


def _split_items(raw: bytes, n: int, code_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Item values (8-byte big-endian slot + packed code) -> (slots, codes)."""
    table = np.frombuffer(raw, dtype=np.uint8).reshape(n, SLOT_BYTES + code_width)
    slots = np.ascontiguousarray(table[:, :SLOT_BYTES]).view(">u8").reshape(-1).astype(np.int64)
    return slots, np.ascontiguousarray(table[:, SLOT_BYTES:])


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


class _Borrowed:
    """Lets a long-lived snapshot transaction be used in a `with` block without being closed by it."""

    def __init__(self, txn: lmdb.Transaction):
        self.txn = txn

    def __enter__(self) -> lmdb.Transaction:
        return self.txn

    def __exit__(self, *exc: object) -> None:
        return None
