"""A shard's LMDB environment and its records: items (slot + code + checksum), feature blocks, metadata, and the
counters kept beside them (generation, blocks, slots used), each checked against its bounds before it is trusted.

An item's features live in a numbered slot; slots are packed BLOCK_BYTES to an LMDB value ("feature block"), so
the re-ranking stage finds a candidate's features by arithmetic instead of a B-tree lookup (~3 us each on a large
file). Every item record carries a CRC-32 of its code and feature row, so damage is found (`scan`) instead of
silently ranking garbage. Each shard records which catalog layout and which shard number it belongs to, so a
manifest edited to disagree with the shards is refused. `shards.shard.Shard` keeps the in-memory index over
these records.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb
import msgpack
import numpy as np

from shards.codes import code_bytes, padded_bytes
from shards.errors import CatalogError, DamagedError, DuplicateIdError
from shards.lmdb_file import DamagedFile, used_pages_beyond

INITIAL_MAP_SIZE = 64 << 30  # address space only: the file grows as pages are used
BLOCK_BYTES = 256 << 10  # a feature block's default size: few blocks to locate, cheap to rewrite the last
SLOT_BYTES = 8
CHECKSUM_BYTES = 4  # CRC-32 of code + feature row, after the code in each item record
MAX_COUNTER = 2**62  # a stored counter beyond this is damage, not a count
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


def keys_to_ids(keys: list[bytes]) -> np.ndarray:
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
        data_file = path / "data.mdb"
        if data_file.exists() and not os.access(data_file, os.R_OK):
            raise CatalogError(f"{data_file}: no permission to read it")
        try:
            env = lmdb.open(str(path), max_dbs=4, map_size=INITIAL_MAP_SIZE, readonly=readonly, readahead=False,
                            meminit=False, max_readers=512, sync=False, lock=not readonly or _can_lock(path))
        except lmdb.Error as error:
            raise CatalogError(f"{data_file}: not a readable LMDB file ({error})") from error
        _cover_last_page(env, path / "data.mdb", readonly)
        try:
            databases = [env.open_db(name, create=not readonly) for name in _DATABASES]
        except lmdb.Error as error:
            env.close()
            raise DamagedError(f"{path / 'data.mdb'}: damaged or not a latenthash shard ({error})") from error
        _ENVIRONMENTS[key] = [env, 1, readonly, databases]
        return env, databases


def _can_lock(path: Path) -> bool:
    """Whether a reader uses the shard's lock file (LMDB's reader table, which keeps a writer from reusing the
    pages it reads): that needs write access. A reader of a folder it cannot write reads without it, as LMDB
    allows; a writable folder whose lock file this user cannot write may have a writer: refused in words."""
    lock_file = path / "lock.mdb"
    if os.access(lock_file if lock_file.exists() else path, os.W_OK):
        return True
    if os.access(path, os.W_OK):
        raise CatalogError(f"{lock_file}: no write access; readers need it while the folder is writable")
    return False


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



class ShardRecords:
    """One shard's LMDB environment: reads in a reader's snapshot (or a fresh transaction for the writer), writes
    in one transaction each, and the counters kept beside the records."""

    def __init__(self, path: str | os.PathLike, layout: ShardLayout, readonly: bool, number: int, count: int,
                 writer_may_join: bool, create: bool, repair: bool):
        """See `shards.shard.Shard`."""
        self.path = Path(path)
        self.layout = layout
        self.readonly = readonly
        self.number = number  # its place in the catalog: it holds the ids with id % count == number
        self.data_file = self.path / "data.mdb"
        if not self.data_file.is_file():
            if readonly or not create:
                raise CatalogError(f"{self.data_file}: shard data file is missing")
            self.path.mkdir(parents=True, exist_ok=True)
        self.env, databases = _open_env(self.path, readonly and not writer_may_join)
        self._items, self._blocks, self._meta, self._info = databases
        self._snapshot: lmdb.Transaction | None = None
        self._hidden: frozenset[bytes] = frozenset()
        self.repairs: list[str] = []
        try:
            self._check_identity(number, count)
            if repair:
                self._repair_counters()
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

    def close(self) -> None:
        if self._snapshot is not None:
            self._snapshot.abort()
            self._snapshot = None
        _close_env(self.path)

    def _read(self) -> Any:
        """The reader's snapshot, or a fresh read transaction for the writer (usable with `with`); values come
        back as memoryviews into LMDB's map, valid until the transaction ends."""
        if self._snapshot is not None:
            return _Borrowed(self._snapshot)
        return self.env.begin(buffers=True)

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

    # ------------------------------------------------------------------ counters
    def _counter(self, txn: lmdb.Transaction, key: bytes) -> int:
        """A count kept as decimal text in the info database (0 when absent); DamagedError names the file and
        the value if it is not a whole number in [0, MAX_COUNTER]."""
        raw = txn.get(key, db=self._info)
        if raw is None:
            return 0
        value = whole_number(raw, MAX_COUNTER)
        if value is None:
            raise DamagedError(f"{self.data_file}: stored {key.decode()} {bytes(raw)!r} is not a whole number in "
                               f"[0, {MAX_COUNTER}]")
        return value

    def _feature_extent(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """(blocks, slots used) as the stored feature blocks say: numbered from 0 without gaps, only the last
        partly filled. DamagedError if they have gaps (nothing to count from)."""
        blocks = txn.stat(self._blocks)["entries"]
        cursor = txn.cursor(db=self._blocks)
        if not cursor.last():
            return 0, 0
        last = int.from_bytes(cursor.key(), "big")
        if last != blocks - 1:
            raise DamagedError(f"{self.data_file}: {blocks} feature blocks are stored, numbered up to {last}: "
                               "some are missing")
        return blocks, last * self.layout.block_items + -(-len(cursor.value()) // self.layout.feature_bytes)

    def _counter_problems(self, txn: lmdb.Transaction) -> list[str]:
        """What is wrong with the counters kept beside the records, one line each (the records themselves are
        checked by `scan`)."""
        problems, counters = [], {}
        for key in (b"generation", b"blocks", b"slots_used"):
            try:
                counters[key] = self._counter(txn, key)
            except DamagedError as error:
                problems.append(str(error))
        for key, truth in zip((b"blocks", b"slots_used"), self._feature_extent(txn)):
            if counters.get(key, truth) != truth:
                problems.append(f"{self.data_file}: stored {key.decode()} {counters[key]} does not match its "
                                f"feature blocks ({truth})")
        return problems

    def _repair_counters(self) -> None:
        """Rewrite counters that are damaged or disagree with the feature blocks from the blocks themselves
        (a repair by `engine.verify`); the stored index is dropped with them, to be rebuilt from the items."""
        def rewrite(txn: lmdb.Transaction) -> list[str]:
            problems = self._counter_problems(txn)
            if problems:
                for key, truth in zip((b"blocks", b"slots_used"), self._feature_extent(txn)):
                    txn.put(key, str(truth).encode(), db=self._info)
                if whole_number(txn.get(b"generation", db=self._info) or b"0", MAX_COUNTER) is None:
                    txn.put(b"generation", b"1", db=self._info)
                txn.delete(b"index_generation", db=self._info)
            return problems

        self.repairs += self._write(rewrite)

    def _bump_generation(self, txn: lmdb.Transaction) -> int:
        generation = self._counter(txn, b"generation") + 1
        txn.put(b"generation", str(generation).encode(), db=self._info)
        return generation

    def slots_used(self) -> int:
        """Feature slots handed out so far (in a reader's snapshot): every item added later gets one past it."""
        with self._read() as txn:
            return self._counter(txn, b"slots_used")

    # ------------------------------------------------------------------ records
    def _put_items(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray, sums: np.ndarray,
                   metas: list[bytes] | None) -> tuple[int, np.ndarray]:
        """Store one batch in one transaction; returns (the new generation, the batch's feature slots).
        DuplicateIdError (nothing stored) if an id is already here."""
        self._require_writer()
        keys = id_keys(ids)

        def put(txn: lmdb.Transaction) -> tuple[int, np.ndarray]:
            first = self._counter(txn, b"slots_used")
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

        return self._write(put)

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

    def _delete_items(self, ids: np.ndarray) -> tuple[int, int]:
        """Delete ids (absent ones are ignored) in one transaction; returns (how many were present, the new
        generation)."""
        self._require_writer()
        keys = id_keys(ids)

        def remove(txn: lmdb.Transaction) -> tuple[int, int]:
            removed = sum(txn.delete(k, db=self._items) for k in keys)
            for k in keys:
                txn.delete(k, db=self._meta)
            return removed, self._bump_generation(txn)

        return self._write(remove)

    def _get(self, ids: np.ndarray, db: Any) -> list[bytes | None]:
        keys = id_keys(ids)
        with self._read() as txn:
            found = {bytes(k): bytes(v) for k, v in txn.cursor(db=db).getmulti(keys)}
        return [found.get(k) if k not in self._hidden else None for k in keys]

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
            raise DamagedError(f"{self.data_file}: metadata of item {int(item_id)} is damaged")
        return meta

    def metadata_items(self) -> Iterator[tuple[int, dict | None]]:
        """(id, metadata) of every item with metadata, in id order, from one consistent transaction."""
        with self._read() as txn:
            for key, raw in txn.cursor(db=self._meta):
                if self._hidden and bytes(key) in self._hidden:
                    continue
                item = int.from_bytes(key, "big")
                yield item, self._unpack_meta(item, raw)

    def _locate_blocks(self, txn: lmdb.Transaction) -> tuple[np.ndarray, np.ndarray]:
        """(address in memory, length in bytes) of every feature block, indexed by block number (as many as are
        stored: never sized by a counter)."""
        count = txn.stat(self._blocks)["entries"]
        addresses, lengths = np.zeros(count, np.int64), np.zeros(count, np.int64)
        for key, value in txn.cursor(db=self._blocks):
            block = int.from_bytes(key, "big")
            if block < count:
                addresses[block], lengths[block] = np.frombuffer(value, np.uint8).ctypes.data, len(value)
        return addresses, lengths

    def scan(self) -> Iterator[tuple[int, bytes, bytes, dict | None, str | None]]:
        """Every item record checked against its checksum, feature block and metadata: (id, code, feature bytes,
        metadata, what is wrong or None), in id order from one consistent transaction."""
        per_block, width, code_width = self.layout.block_items, self.layout.feature_bytes, self.layout.code_bytes
        with self._read() as txn:
            blocks, metas = txn.cursor(db=self._blocks), txn.cursor(db=self._meta)
            for key, value in txn.cursor(db=self._items):
                if self._hidden and bytes(key) in self._hidden:
                    continue
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
                elif not np.isfinite(np.frombuffer(row, self.layout.feature_dtype)).all():
                    problem = "its features are not finite (NaN or inf): it would rank at random"
                try:
                    meta = self._unpack_meta(item_id, metas.get(key))
                except CatalogError:
                    meta, problem = None, problem or "its metadata is damaged"
                yield item_id, code, row, meta, problem


def whole_number(raw: bytes | memoryview, high: int) -> int | None:
    """Decimal ASCII digits naming a number in [0, high], else None."""
    text = bytes(raw)
    return int(text) if text.isdigit() and len(text) <= len(str(high)) and int(text) <= high else None


class _Borrowed:
    """Lets a long-lived snapshot transaction be used in a `with` block without being closed by it."""

    def __init__(self, txn: lmdb.Transaction):
        self.txn = txn

    def __enter__(self) -> lmdb.Transaction:
        return self.txn

    def __exit__(self, *exc: object) -> None:
        return None
