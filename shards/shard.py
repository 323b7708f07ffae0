"""One shard: an LMDB environment holding items (code + feature slot), feature blocks, metadata and a Faiss
binary index.

An item's features live in a numbered slot; slots are packed BLOCK_BYTES to an LMDB value ("feature block"), so
the re-ranking stage finds a candidate's features by arithmetic instead of a B-tree lookup (~3 us each on a large
file). In memory a shard keeps a CodeIndex (ids sorted, padded codes in the same order, the Faiss index over them)
and the slots in that order. The serialized index is stored beside the items with the generation it reflects
and a checksum; opening a shard whose stored index is missing, stale or damaged rebuilds it from the items.

Every item record carries a CRC-32 of its code and feature row, so damage is found (`verify`, and cheaply on the
rows a search returns) instead of silently ranking garbage. Each shard also records which catalog layout and
which shard number it belongs to, so a manifest edited to disagree with the shards is refused.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import lmdb
import msgpack
import numpy as np

from shards.codes import code_bytes, pad_codes, padded_bytes
from shards.errors import CatalogError, DamagedError, DuplicateIdError
from shards.index import CodeIndex, find_sorted, index_type
from shards.lmdb_file import DamagedFile, used_pages_beyond

INITIAL_MAP_SIZE = 64 << 30  # address space only: the file grows as pages are used
BLOCK_BYTES = 256 << 10  # a feature block's default size: few blocks to locate, cheap to rewrite the last
SLOT_BYTES = 8
CHECKSUM_BYTES = 4  # CRC-32 of code + feature row, after the code in each item record
FEATURE_DTYPES = ("float16", "float32")


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

    @property
    def item_bytes(self) -> int:
        return SLOT_BYTES + self.code_bytes + CHECKSUM_BYTES


def item_checksum(code: bytes | np.ndarray, row: bytes | np.ndarray) -> int:
    """CRC-32 of an item's packed code followed by its stored feature bytes."""
    return zlib.crc32(row, zlib.crc32(code))


def row_checksums(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`item_checksum` of each row."""
    if len(codes) == 0:
        return np.empty(0, np.uint32)
    codes = np.ascontiguousarray(codes, np.uint8)
    rows = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
    return np.fromiter((item_checksum(c, r) for c, r in zip(codes, rows)), np.uint32, len(codes))


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
        _cover_last_page(env, path / "data.mdb", readonly)
        try:
            databases = [env.open_db(name, create=not readonly) for name in _DATABASES]
        except lmdb.Error as error:
            env.close()
            raise DamagedError(f"{path / 'data.mdb'}: damaged or not a latenthash shard ({error})") from error
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


def _missing_bytes(env: lmdb.Environment, data_file: Path) -> tuple[int, int]:
    """(file size, size its last page needs)."""
    return data_file.stat().st_size, (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def _cover_last_page(env: lmdb.Environment, data_file: Path, readonly: bool) -> None:
    """Refuse a data file cut short; grow (writers) a file that ends early but whose used pages all lie inside.

    A reader maps the file and never touches a free page, so an early end is harmless to it; a page the trees use
    past the end would fault (SIGBUS) or abort LMDB, so that is refused before LMDB reads anything."""
    size, needed = _missing_bytes(env, data_file)
    if size >= needed:
        return
    try:
        beyond = used_pages_beyond(data_file, size)
    except DamagedFile as error:
        env.close()
        raise DamagedError(f"{data_file}: damaged ({error})") from None
    if beyond:
        env.close()
        raise DamagedError(f"{data_file}: truncated ({size} bytes; {len(beyond)} pages in use lie past its end, "
                           f"from page {min(beyond)})")
    if not readonly:
        os.truncate(data_file, needed)  # zeros where LMDB only has free pages: the next reader sees a whole file


class Shard:
    def __init__(self, path: str | os.PathLike, layout: ShardLayout, readonly: bool = True,
                 number: int = 0, count: int = 1, writer_may_join: bool = False):
        """`writer_may_join`: a reader whose process may later open a writer on this shard too (LMDB allows one
        environment per file per process, so the reader opens it writable; it still writes nothing)."""
        self.path = Path(path)
        self.layout = layout
        self.readonly = readonly
        self.number = number  # its place in the catalog: it holds the ids with id % count == number
        self.data_file = self.path / "data.mdb"
        if readonly and not self.data_file.is_file():
            raise CatalogError(f"{self.data_file}: shard data file is missing")
        self.path.mkdir(parents=True, exist_ok=True)
        self.env, databases = _open_env(self.path, readonly and not writer_may_join)
        self._items, self._blocks, self._meta, self._info = databases
        self._snapshot: lmdb.Transaction | None = None
        self._block_map: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        try:
            self._check_identity(number, count)
            self.refresh()
        except BaseException:
            self.close()
            raise

    def identity(self, number: int, count: int) -> dict:
        """What this shard records about the catalog it belongs to."""
        return {"shard": number, "shard_count": count, "bits": self.layout.bits,
                "feature_dim": self.layout.feature_dim, "feature_dtype": self.layout.feature_dtype,
                "block_items": self.layout.block_items, "item_bytes": self.layout.item_bytes}

    def _check_identity(self, number: int, count: int) -> None:
        """A shard of another layout or position (an edited manifest, a moved folder) is refused, not misread."""
        expected = self.identity(number, count)
        with self.env.begin() as txn:
            raw = txn.get(b"identity", db=self._info)
            has_items = txn.stat(self._items)["entries"] > 0
        if raw is None:
            if has_items:
                raise CatalogError(f"{self.data_file}: holds items but no layout record; it was written by an "
                                   "older latenthash: rebuild the catalog with build-index")
            if not self.readonly:
                self._write(lambda txn: txn.put(b"identity", json.dumps(expected).encode(), db=self._info))
            return
        try:
            recorded = json.loads(bytes(raw))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedError(f"{self.data_file}: its layout record is damaged") from None
        wrong = sorted(k for k in expected if not isinstance(recorded, dict) or recorded.get(k) != expected[k])
        if wrong:
            said = ", ".join(f"{k} {recorded.get(k) if isinstance(recorded, dict) else '?'} (manifest: {expected[k]})"
                             for k in wrong)
            raise CatalogError(f"{self.data_file}: does not match the catalog manifest: {said}")

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

    _INDEX_BLOBS = (b"ids", b"slots", b"sums", b"codes", b"index")

    def _load(self, txn: lmdb.Transaction) -> None:
        self._pending = []
        self.generation = int(bytes(txn.get(b"generation", db=self._info) or b"0"))
        entries = txn.stat(self._items)["entries"]
        stored = txn.get(b"index_generation", db=self._info)
        blobs = [txn.get(name, db=self._info) for name in self._INDEX_BLOBS]
        checksum = txn.get(b"index_checksum", db=self._info)
        if (stored is not None and int(bytes(stored)) == self.generation and None not in blobs
                and checksum is not None and int(bytes(checksum)) == _crc(blobs)):
            try:
                ids, slots, sums = (np.frombuffer(b, dtype=t).copy() for b, t in zip(blobs, (np.int64, np.int64,
                                                                                            np.uint32)))
                codes = np.frombuffer(blobs[3], dtype=np.uint8).reshape(-1, self.layout.padded_bytes).copy()
                index = faiss.deserialize_index_binary(np.frombuffer(blobs[4], np.uint8))
                kind = index_type(self.layout.index_type)
                if (len(ids) == len(slots) == len(sums) == len(codes) == index.ntotal == entries
                        and index.d == self.layout.padded_bytes * 8 and type(index).__name__ == kind.faiss_class):
                    self.code_index = CodeIndex(ids, codes, kind, index)
                    self.slots, self.sums = slots, sums
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
        if any(len(v) != self.layout.item_bytes for v in values):
            raise CatalogError(f"{self.data_file}: item records of the wrong size; run engine.verify")
        ids = _keys_to_ids(keys) if keys else np.empty(0, dtype=np.int64)
        slots, packed, sums = _split_items(b"".join(values), len(keys), self.layout.code_bytes)
        self._set_index(ids, pad_codes(packed, self.layout.bits), slots, sums)

    def _set_index(self, ids: np.ndarray, padded: np.ndarray, slots: np.ndarray, sums: np.ndarray) -> None:
        layout = self.layout
        order = np.argsort(ids, kind="stable")  # id order: ties come out broken by id (see shards.index)
        padded = np.ascontiguousarray(padded[order])
        self.code_index = CodeIndex(ids[order], padded, index_type(layout.index_type), hash_bits=layout.hash_bits,
                                    previous=getattr(self, "code_index", None))
        self.slots, self.sums = slots[order], sums[order]

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
            if int(txn.get(b"generation", db=self._info) or b"0") != self.generation:
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
        if self._snapshot is not None:
            self._snapshot.abort()
            self._snapshot = None
        _close_env(self.path)

    # ------------------------------------------------------------------ writes
    def _require_writer(self) -> None:
        if self.readonly:
            raise CatalogError(f"{self.path}: opened read-only")

    def _write(self, body: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run `body` in one write transaction, doubling the map size and retrying while LMDB is full. A failed
        commit (a full disk) leaves the last committed state; the error names the file."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    result = body(txn)
                break
            except lmdb.MapFullError:
                try:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.Error as error:
                    raise CatalogError(f"{self.data_file}: map full and cannot grow while readers of this "
                                       f"process hold snapshots; refresh or close them ({error})") from error
            except lmdb.Error as error:
                raise CatalogError(f"{self.data_file}: write failed, nothing of it was committed ({error}); is the "
                                   "disk full?") from error
        size, needed = _missing_bytes(self.env, self.data_file)
        if size < needed:  # a page freed in this commit was never written: let readers map a whole file
            os.truncate(self.data_file, needed)
        return result

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
                raise DamagedError(f"{self.data_file}: feature block {block} is damaged "
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
        sums = row_checksums(codes, features)

        def put(txn: lmdb.Transaction) -> tuple[int, np.ndarray]:
            first = int(txn.get(b"slots_used", db=self._info) or b"0")
            slots = np.arange(first, first + len(ids), dtype=np.int64)
            values = np.concatenate([slots.astype(">u8").view(np.uint8).reshape(-1, SLOT_BYTES), codes,
                                     sums.astype(">u4").view(np.uint8).reshape(-1, CHECKSUM_BYTES)], axis=1)
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
        self._pending.append((np.asarray(ids, dtype=np.int64), pad_codes(codes, self.layout.bits), slots, sums))

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
        width = self.layout.code_bytes
        return [v[SLOT_BYTES:SLOT_BYTES + width] if v is not None else None for v in self._get(ids, self._items)]

    def metas(self, ids: np.ndarray) -> list[dict | None]:
        return [self._unpack_meta(i, r) for i, r in zip(ids, self._get(ids, self._meta))]

    def _unpack_meta(self, item_id: int, raw: bytes | None) -> dict | None:
        if raw is None:
            return None
        try:
            meta = msgpack.unpackb(raw)
        except (ValueError, msgpack.UnpackException):
            meta = None
        if not isinstance(meta, dict):
            raise DamagedError(f"{self.data_file}: metadata of item {int(item_id)} is damaged; run engine.verify")
        return meta

    def metadata_items(self) -> Iterator[tuple[int, dict | None]]:
        """(id, metadata) of every item with metadata, in id order, from one consistent transaction."""
        with self._read() as txn:
            for key, raw in txn.cursor(db=self._meta):
                item = int.from_bytes(key, "big")
                yield item, self._unpack_meta(item, raw)

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
                raise CatalogError(f"{self.data_file}: item {item_id}: {problem}; run engine.verify")
            yield item_id, code, row, meta

    def scan(self) -> Iterator[tuple[int, bytes, bytes, dict | None, str | None]]:
        """Every item record checked against its checksum, feature block and metadata: (id, code, feature bytes,
        metadata, what is wrong or None), in id order from one consistent transaction."""
        per_block, width, code_width = self.layout.block_items, self.layout.feature_bytes, self.layout.code_bytes
        with self._read() as txn:
            blocks, metas = txn.cursor(db=self._blocks), txn.cursor(db=self._meta)
            for key, value in txn.cursor(db=self._items):
                item_id = int.from_bytes(key, "big")
                if len(value) != self.layout.item_bytes:
                    yield item_id, b"", b"", None, f"record of {len(value)} bytes, expected {self.layout.item_bytes}"
                    continue
                code = bytes(value[SLOT_BYTES:SLOT_BYTES + code_width])
                block, offset = divmod(int.from_bytes(value[:SLOT_BYTES], "big"), per_block)
                row = bytes((blocks.get(id_keys([block])[0]) or b"")[offset * width:(offset + 1) * width])
                problem = None
                if len(row) != width:
                    problem = f"its feature row (block {block}) is missing"
                elif item_checksum(code, row) != int.from_bytes(value[-CHECKSUM_BYTES:], "big"):
                    problem = "checksum mismatch: its code or feature row is damaged"
                try:
                    meta = self._unpack_meta(item_id, metas.get(key))
                except CatalogError:
                    meta, problem = None, problem or "its metadata is damaged"
                yield item_id, code, row, meta, problem

    def verify(self) -> Iterator[tuple[int | None, str]]:
        """(item id or None for the shard itself, what is wrong) for every damaged item, and for a search index
        that disagrees with the items (it would then give wrong answers until rebuilt)."""
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
            yield None, f"search index holds {len(indexed.ids)} ids, the items {len(ids)}; rebuild with --repair"
        elif ids and indexed.codes[:, :width].tobytes() != b"".join(codes):
            yield None, "search index codes differ from the item records; rebuild with --repair"

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


class _Borrowed:
    """Lets a long-lived snapshot transaction be used in a `with` block without being closed by it."""

    def __init__(self, txn: lmdb.Transaction):
        self.txn = txn

    def __enter__(self) -> lmdb.Transaction:
        return self.txn

    def __exit__(self, *exc: object) -> None:
        return None
