"""A catalog: a directory of shards plus a manifest, searched in two stages (Hamming, then Euclidean).

Item ids are non-negative 64-bit integers, unique across the catalog; an item lives in shard `id % shard_count`.
One writer at a time (a lock file); readers work from snapshots and see a write once they `refresh()`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import faiss
import msgpack
import numpy as np

from shards.codes import MAX_BITS, MAX_FEATURE_DIM, pad_codes
from shards.errors import CatalogError, DamagedError, DuplicateIdError, WriterBusyError
from shards.filters import Filter, FilterIndex
from shards.index import CodeIndex, find_sorted, index_type
from shards.ranking import Hits, merge_hits, nearest, pool_size
from shards.shard import BLOCK_BYTES, FEATURE_DTYPES, Shard, ShardLayout, gather_rows, row_checksums

MANIFEST = "manifest.json"
JOURNAL = "add.journal"
WRITER_LOCK = "writer.lock"
COMMIT_LOCK = "commit.lock"
FORMAT = "latenthash-catalog"
FORMAT_VERSION = 3  # 2: features in slot-addressed blocks; 3: item checksums and shard layout records
MAX_SHARDS = 4096
_pack = msgpack.Packer(use_bin_type=True).pack  # metadata format: msgpack, ~10x faster than json here

# Lock files this process holds. A forked child (a decoding worker) gets copies of their descriptors, and a
# flock lives as long as any copy: the child must drop them, or it would hold the catalog after its parent died.
_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    if _HELD_LOCKS:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _HELD_LOCKS:
            os.dup2(null, fd)  # the descriptor now names /dev/null: the lock's file is no longer held here
        os.close(null)
        _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@dataclass
class Manifest:
    bits: int
    feature_dim: int
    shard_count: int = 4
    feature_dtype: str = "float16"
    index_type: str = "flat"
    hash_bits: int = 16
    model_fingerprint: str | None = None
    block_items: int = 0  # feature rows per LMDB block; 0 = BLOCK_BYTES worth, fixed when the catalog is made
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.block_items and type(self.feature_dim) is int and self.feature_dim > 0 \
                and self.feature_dtype in FEATURE_DTYPES:
            row = self.feature_dim * np.dtype(self.feature_dtype).itemsize
            self.block_items = max(1, BLOCK_BYTES // row)

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.bits, self.feature_dim, self.feature_dtype, self.index_type, self.hash_bits,
                           self.block_items)

    def check(self) -> None:
        """Every field of the right type and within bounds (a manifest is a file anyone can edit)."""
        def integer(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise CatalogError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

        integer("bits", 1, MAX_BITS)
        integer("feature_dim", 1, MAX_FEATURE_DIM)
        integer("shard_count", 1, MAX_SHARDS)
        integer("hash_bits", 1, 64)
        integer("block_items", 1, 1 << 24)
        if self.feature_dtype not in FEATURE_DTYPES:
            raise CatalogError(f"unknown feature dtype {self.feature_dtype!r}; choose one of {', '.join(FEATURE_DTYPES)}")
        index_type(self.index_type)
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise CatalogError(f"model_fingerprint must be a string, got {self.model_fingerprint!r}")

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        file = path / MANIFEST
        if not file.is_file():
            raise CatalogError(f"{file}: missing; {path} is not a latenthash catalog")
        try:
            fields = json.loads(file.read_bytes().decode("utf-8"))
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            if fields.get("format") != FORMAT:
                raise CatalogError(f"{file}: not a latenthash catalog manifest")
            unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
            if unknown:
                raise TypeError(f"unknown fields {', '.join(map(str, unknown))}")
            manifest = cls(**fields)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise CatalogError(f"{file}: corrupted manifest ({error})") from error
        if type(manifest.format_version) is not int or manifest.format_version > FORMAT_VERSION:
            raise CatalogError(f"{file}: format version {manifest.format_version} is newer than this latenthash "
                               f"reads ({FORMAT_VERSION}); upgrade latenthash")
        if manifest.format_version < FORMAT_VERSION:
            raise CatalogError(f"{file}: format version {manifest.format_version} was written by an older "
                               f"latenthash; rebuild the catalog with build-index")
        try:
            manifest.check()
        except CatalogError as error:
            raise CatalogError(f"{file}: corrupted manifest ({error})") from None
        return manifest


@dataclass
class Item:
    id: int
    code: np.ndarray  # packed uint8
    features: np.ndarray  # float32
    meta: dict | None


def _write_atomic(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        directory = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CatalogError(f"{file}: could not be written ({error.strerror or error})") from error


def _per_query(tasks: list, parts: list, n_queries: int) -> list[list]:
    """Regroup what each (unit, query slice) task found into one list of parts per query."""
    per_query: list[list] = [[] for _ in range(n_queries)]
    for (_, rows), found in zip(tasks, parts):
        for q, hits in zip(range(rows.start, rows.stop), found):
            per_query[q].append(hits)
    return per_query


class Catalog:
    remote = False  # its shards are searched in this process: the two stages can be timed apart

    def __init__(self, path: Path, manifest: Manifest, readonly: bool, threads: int | None = None,
                 shards: Sequence[int] | None = None, writer_may_join: bool = False):
        self.path = path
        self.manifest = manifest
        self.readonly = readonly
        self._lock_file = None
        self._pool: ThreadPoolExecutor | None = None
        self._merged: CodeIndex | None = None
        self._merged_from: list[CodeIndex] = []
        self._id_order: tuple[list[CodeIndex], np.ndarray] | None = None
        self._locator: tuple[np.ndarray, np.ndarray] | None = None
        self._forget_filters()
        if not readonly:
            self._take_writer_lock()
        self.shards: list[Shard] = []
        try:
            extra = sorted(p.name for p in path.glob("shard-*")
                           if not (p.name[6:].isdigit() and int(p.name[6:]) < manifest.shard_count))
            if extra:
                raise CatalogError(f"{path / MANIFEST}: says {manifest.shard_count} shards, but {', '.join(extra)} "
                                   "also exist: the manifest does not match the catalog")
            held = range(manifest.shard_count) if shards is None else sorted(set(shards))
            if shards is not None and not all(0 <= i < manifest.shard_count for i in held):
                raise CatalogError(f"{path}: shards are numbered 0..{manifest.shard_count - 1}; got {list(shards)}")
            with self._commit_lock(exclusive=not readonly):
                for i in held:
                    self.shards.append(Shard(path / f"shard-{i:04d}", manifest.layout, readonly, i,
                                             manifest.shard_count, writer_may_join))
                if not readonly:
                    self._roll_back_unfinished_add()
        except BaseException:
            self.close(flush=False)
            raise
        self.threads = threads or min(manifest.shard_count * 2, os.cpu_count() or 1)
        self._fp16 = faiss.ScalarQuantizer(manifest.feature_dim, faiss.ScalarQuantizer.QT_fp16)

    # ------------------------------------------------------------------ create / open / close
    @classmethod
    def create(cls, path: str | os.PathLike, bits: int, feature_dim: int, shards: int = 4,
               index: str = "flat", feature_dtype: str = "float16", model_fingerprint: str | None = None,
               hash_bits: int = 16, threads: int | None = None, block_items: int = 0) -> "Catalog":
        """A new, empty catalog opened for writing. `block_items`: feature rows per LMDB block (default: 256 KiB
        worth)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CatalogError(f"{path / MANIFEST}: a catalog already exists here")
        if bits < 1 or feature_dim < 1 or shards < 1 or block_items < 0:
            raise CatalogError(f"{path}: bits, feature dim, shard count and block size must be positive")
        index_type(index)
        if feature_dtype not in FEATURE_DTYPES:
            raise CatalogError(f"unknown feature dtype '{feature_dtype}'; choose one of {', '.join(FEATURE_DTYPES)}")
        manifest = Manifest(bits=bits, feature_dim=feature_dim, shard_count=shards, feature_dtype=feature_dtype,
                            index_type=index, hash_bits=hash_bits, model_fingerprint=model_fingerprint,
                            block_items=block_items)
        manifest.check()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CatalogError(f"{path}: cannot create the catalog folder ({error.strerror or error})") from error
        # Shard folders without a manifest are what a creation that failed (a full disk) left: nothing was ever
        # committed to them, since items are only added after the manifest is written.
        for debris in path.glob("shard-*"):
            if debris.is_dir() and {f.name for f in debris.iterdir()} <= {"data.mdb", "lock.mdb"}:
                shutil.rmtree(debris)
        catalog = cls(path, manifest, readonly=False, threads=threads)
        _write_atomic(path / MANIFEST, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
        return catalog

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = True, model_fingerprint: str | None = None,
             threads: int | None = None, shards: Sequence[int] | None = None,
             writer_may_join: bool = False) -> "Catalog":
        """Open an existing catalog; with `model_fingerprint`, refuse one whose codes another model made.
        `shards`: only these shard numbers, as one node of a cluster serves them; searches and reads then see
        only the items those shards hold, and a writer takes only their items (one writer at a time still).
        `writer_may_join`: a reader beside which this process may later open a writer."""
        path = Path(path)
        manifest = Manifest.read(path)
        if model_fingerprint is not None and manifest.model_fingerprint not in (None, model_fingerprint):
            raise CatalogError(f"{path / MANIFEST}: made by model {manifest.model_fingerprint}, not "
                               f"{model_fingerprint}; its codes are not comparable")
        if (readonly or shards is not None) and (path / JOURNAL).exists() and os.access(path, os.W_OK):
            try:  # a writer died mid-batch: finish its rollback in every shard first, unless a live writer
                cls(path, manifest, readonly=False).close()  # holds the catalog (it rolls its own batch back)
            except WriterBusyError:
                if not readonly:
                    raise
        return cls(path, manifest, readonly, threads, shards, writer_may_join)

    def _take_writer_lock(self) -> None:
        try:
            self._lock_file = open(self.path / WRITER_LOCK, "a")
        except OSError as error:
            raise CatalogError(f"{self.path / WRITER_LOCK}: cannot open for writing ({error.strerror})") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise WriterBusyError(f"{self.path / WRITER_LOCK}: another process is writing this catalog") from None
        _HELD_LOCKS.add(self._lock_file.fileno())

    @contextlib.contextmanager
    def _commit_lock(self, exclusive: bool) -> Iterator[None]:
        """Writers commit a batch's shards under an exclusive lock and readers take their snapshots under a
        shared one, so a reader sees each batch in every shard or in none."""
        try:
            fd = os.open(self.path / COMMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only copy of a catalog: nobody can be writing it
            yield
            return
        _HELD_LOCKS.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            _HELD_LOCKS.discard(fd)
            os.close(fd)

    def flush(self) -> None:
        with self._commit_lock(exclusive=True):  # readers open shards under the shared lock: never mid-write
            for shard in self.shards:
                shard.flush()

    def refresh(self) -> None:
        """Readers: see everything committed since opening (or the last refresh)."""
        self._locator = None
        self._forget_filters()
        with self._commit_lock(exclusive=False):
            for shard in self.shards:
                shard.refresh()

    def close(self, flush: bool = True) -> None:
        """Store the search indices (writers, unless `flush` is False) and release everything, even if storing
        fails (a full disk): the committed items stay, and the next open rebuilds the indices from them."""
        self._locator = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        try:
            if flush and not self.readonly and self.shards:
                self.flush()
        finally:
            for shard in self.shards:
                shard.close()
            self.shards = []
            if self._lock_file is not None:
                _HELD_LOCKS.discard(self._lock_file.fileno())
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        try:
            self.close()
        except CatalogError:
            if kind is None:  # an error already on its way out says more than a failed flush after it
                raise

    # ------------------------------------------------------------------ validation
    @property
    def bits(self) -> int:
        return self.manifest.bits

    def _check_codes(self, codes: np.ndarray, what: str = "codes") -> np.ndarray:
        codes = np.asarray(codes)
        width = self.manifest.layout.code_bytes
        if codes.ndim != 2 or codes.shape[1] != width or codes.dtype != np.uint8:
            raise CatalogError(f"{self.path}: {what} must be uint8 of shape (n, {width}) for {self.bits}-bit codes, "
                               f"got {codes.dtype} {codes.shape}")
        return np.ascontiguousarray(codes)

    def _check_features(self, features: np.ndarray, n: int) -> np.ndarray:
        features = np.asarray(features)
        if features.shape != (n, self.manifest.feature_dim) or not np.issubdtype(features.dtype, np.number):
            raise CatalogError(f"{self.path}: features must have shape ({n}, {self.manifest.feature_dim}), "
                               f"and be numbers, got {features.dtype} {features.shape}")
        if not np.isfinite(features).all():  # NaN or inf: such an item is not even its own nearest neighbour
            rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
            raise CatalogError(f"{self.path}: features of rows {rows[:10].tolist()} are not finite (NaN or inf)")
        return features

    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise CatalogError(f"{self.path}: ids must be a 1-D integer array")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise CatalogError(f"{self.path}: ids must be non-negative")
        return ids

    def _check_held(self, ids: np.ndarray, what: str = "the ids") -> None:
        """A catalog opened on a subset of shards writes only their items."""
        if len(self.shards) < self.manifest.shard_count:
            others = sorted(set((ids % self.manifest.shard_count).tolist()) - {s.number for s in self.shards})
            if others:
                raise CatalogError(f"{self.path}: {what} belong to shards {others[:10]}, not opened here "
                                   f"(shards {[s.number for s in self.shards]})")

    def _by_shard(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each shard, the positions in `ids` of the items it holds."""
        owner = ids % self.manifest.shard_count
        return [np.flatnonzero(owner == shard.number) for shard in self.shards]

    # ------------------------------------------------------------------ writes
    def add(self, ids: Sequence[int] | np.ndarray, codes: np.ndarray, features: np.ndarray,
            metas: Sequence[dict] | None = None) -> None:
        """Add a batch: all of it or none, across shards, even if the process is killed midway."""
        if self.readonly:
            raise CatalogError(f"{self.path}: opened read-only")
        ids = self._check_ids(ids)
        self._check_held(ids)
        codes = self._check_codes(codes)
        features = self._check_features(features, len(ids)).astype(self.manifest.feature_dtype, copy=False)
        if len(codes) != len(ids) or (metas is not None and len(metas) != len(ids)):
            raise CatalogError(f"{self.path}: ids, codes, features and metadata must have the same length")
        if len(np.unique(ids)) != len(ids):
            raise DuplicateIdError(f"{self.path}: the batch names an id twice")
        encoded = [self._pack_meta(item, m) for item, m in zip(ids, metas)] if metas is not None else None
        parts = [(shard, rows) for shard, rows in zip(self.shards, self._by_shard(ids)) if len(rows)]
        for shard, rows in parts:  # refuse before anything is written: no partial batch on a duplicate
            present = [int(ids[r]) for r, code in zip(rows, shard.codes(ids[rows])) if code is not None]
            if present:
                raise DuplicateIdError(f"{shard.path}: ids already in the catalog: {present[:10]}")
        journal = self.path / JOURNAL
        self._forget_filters()
        _write_atomic(journal, ids.tobytes())
        with self._commit_lock(exclusive=True):
            try:
                for shard, rows in parts:
                    shard.add(ids[rows], codes[rows], features[rows],
                              [encoded[r] for r in rows] if encoded is not None else None)
            except BaseException:  # a shard's commit failed (a full disk): undo the shards that committed
                self._roll_back_unfinished_add()  # if this fails too, the journal stays for the next open
                raise
            journal.unlink()

    def _pack_meta(self, item: int, meta: dict) -> bytes:
        try:
            return _pack(meta)
        except (TypeError, ValueError, UnicodeEncodeError, OverflowError) as error:
            raise CatalogError(f"{self.path}: metadata of item {int(item)} cannot be stored ({error})") from None

    def _roll_back_unfinished_add(self) -> None:
        """An add killed between its shard commits left a journal: undo that batch so adds stay all-or-nothing."""
        journal = self.path / JOURNAL
        if not journal.exists():
            return
        raw = journal.read_bytes()
        if len(raw) % 8:  # written atomically by add(): any other length is damage, not a crash
            raise DamagedError(f"{journal}: damaged ({len(raw)} bytes, not whole 8-byte ids); it names the items "
                               "of a batch that was cut short: compare with build-report.json, or delete it")
        ids = np.frombuffer(raw, dtype=np.int64)
        self._check_held(ids, "the cut-short batch in " + str(journal))
        for shard, rows in zip(self.shards, self._by_shard(ids)):
            if len(rows):
                shard.delete(ids[rows])
        journal.unlink()

    def delete(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete items (absent ids are ignored); returns how many were removed."""
        if self.readonly:
            raise CatalogError(f"{self.path}: opened read-only")
        ids = self._check_ids(ids)
        self._check_held(ids)
        self._forget_filters()
        with self._commit_lock(exclusive=True):
            return sum(shard.delete(ids[rows]) for shard, rows in zip(self.shards, self._by_shard(ids)) if len(rows))

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    count = __len__

    def _to_float32(self, raw: bytes | np.ndarray, n: int) -> np.ndarray:
        """Stored feature bytes of n items to float32; Faiss's SIMD fp16 decoder is ~3x faster than numpy's."""
        array = np.frombuffer(raw, dtype=np.uint8).reshape(n, self.manifest.layout.feature_bytes)
        if self.manifest.feature_dtype == "float16":
            return self._fp16.decode(array)
        return array.view(np.float32).copy()

    def _fetch(self, ids: np.ndarray, read) -> list[bytes | None]:
        """Per id (in order), what `read(shard, ids)` returns from the shard that owns it."""
        found: list[bytes | None] = [None] * len(ids)
        for shard, rows in zip(self.shards, self._by_shard(ids)):
            if len(rows):
                for row, value in zip(rows, read(shard, ids[rows])):
                    found[row] = value
        return found

    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """Full items (None for absent ids)."""
        ids = self._check_ids(ids)
        codes = self._fetch(ids, Shard.codes)
        metas = self._fetch(ids, Shard.metas)
        present = np.array([c is not None for c in codes], bool)
        features = iter(self.features(ids[present]))
        return [Item(int(i), np.frombuffer(c, np.uint8).copy(), next(features), m) if c is not None else None
                for i, c, m in zip(ids, codes, metas)]

    def metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict | None]:
        """Metadata of the given ids (None for absent ids or items stored without any)."""
        return self._fetch(self._check_ids(ids), Shard.metas)

    def _feature_rows(self, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Stored feature bytes of the given ids, (n, feature_bytes) uint8, read straight from LMDB. `positions`:
        the ids' places in the catalog's id order if known (from the coarse stage), else they are looked up."""
        width = self.manifest.layout.feature_bytes
        if self.readonly:
            known, addresses = self._feature_locator()
            if positions is None or len(ids) and (positions.max() >= len(known)
                                                  or not np.array_equal(known[positions], ids)):
                positions, missing = find_sorted(known, ids)
                if missing.any():
                    raise CatalogError(f"{self.path}: ids not in the catalog: {ids[missing][:10].tolist()}")
            return gather_rows(addresses[positions], width)
        rows = np.empty((len(ids), width), np.uint8)
        for shard, positions in zip(self.shards, self._by_shard(ids)):
            if len(positions):
                try:
                    rows[positions] = shard.feature_rows(ids[positions])
                except KeyError as error:
                    raise CatalogError(f"{self.path}: ids not in the catalog: {error.args[0][:10]}") from None
        return rows

    def _feature_locator(self) -> tuple[np.ndarray, np.ndarray]:
        """A reader's (every id sorted, where its feature row lies in memory): one search and one gather find
        the rows of a candidate pool across all shards. Built once per snapshot (~0.1 s per million items)."""
        if self._locator is None:
            ids, order = self._ids_in_order()
            addresses = np.concatenate([shard.feature_addresses() for shard in self.shards])
            self._locator = ids, addresses[order]
        return self._locator

    def _ids_in_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Every id sorted, and the order that sorts the shards' concatenated ids: shared by the merged index and
        the feature locator (sorting 10M ids takes ~1 s), redone when a shard's index changes."""
        indexes = [shard.code_index for shard in self.shards]
        if self._id_order is None or any(a is not b for a, b in zip(self._id_order[0], indexes)):
            order = np.argsort(np.concatenate([i.ids for i in indexes]), kind="stable")
            self._id_order = indexes, order
        order = self._id_order[1]
        return np.concatenate([i.ids for i in indexes])[order], order

    def features(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 features of the given ids, read straight from LMDB (only these records) and checked against
        their checksums."""
        ids = self._check_ids(ids)
        rows = self._feature_rows(ids)
        self._check_rows(ids, rows)
        return self._to_float32(rows, len(ids))

    def _check_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Raise if a stored feature row, or the code searched for it, no longer matches the item's checksum."""
        expected = np.empty(len(ids), np.uint32)
        codes = np.empty((len(ids), self.manifest.layout.code_bytes), np.uint8)
        for shard, positions in zip(self.shards, self._by_shard(ids)):
            if len(positions):
                codes[positions], expected[positions] = shard.checksums(ids[positions])
        bad = ids[row_checksums(codes, rows) != expected]
        if len(bad):
            shard = next(s for s in self.shards if s.number == int(bad[0]) % self.manifest.shard_count)
            raise DamagedError(f"{shard.data_file}: items {bad[:10].tolist()} are damaged (checksum mismatch); "
                               f"run python -m engine.verify --catalog {self.path}")

    def present(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """A mask of the ids the catalog holds (from the in-memory indices: no disk read)."""
        ids = self._check_ids(ids)
        mask = np.zeros(len(ids), bool)
        for shard, positions in zip(self.shards, self._by_shard(ids)):
            if len(positions):
                shard.sync_index()
                mask[positions] = ~find_sorted(shard.code_index.ids, ids[positions])[1]
        return mask

    def verify(self) -> Iterator[tuple[str, int | None, str]]:
        """Check every item against its checksum, feature row and metadata, and every shard's search index
        against its items: (shard folder name, item id or None, what is wrong) for each problem found."""
        for shard in self.shards:
            for item, problem in shard.verify():
                yield shard.path.name, item, problem
        if not self.readonly and (self.path / JOURNAL).exists():
            yield JOURNAL, None, "a batch cut short is still to be rolled back"

    def __iter__(self) -> Iterator[Item]:
        """Every item, shard by shard, in id order within each shard."""
        for shard in self.shards:
            for item_id, code, features, meta in shard.iterate():
                yield Item(item_id, np.frombuffer(code, np.uint8).copy(), self._to_float32(features, 1)[0], meta)

    # ------------------------------------------------------------------ search
    def _search_units(self) -> list[CodeIndex]:
        """What coarse search scans. A flat catalog scans one CodeIndex over every shard: exactly 'one flat index
        over all items', and Faiss's fixed cost per call (~0.6 ms for a 1,000-item selection here) is paid once
        instead of once per shard. It is rebuilt after a write. A hash catalog scans each shard's own index."""
        for shard in self.shards:
            shard.sync_index()
        indexes = [shard.code_index for shard in self.shards]
        if not index_type(self.manifest.index_type).merges_across_shards or len(indexes) == 1:
            return indexes
        if self._merged is None or any(a is not b for a, b in zip(self._merged_from, indexes)):
            ids, order = self._ids_in_order()
            codes = np.concatenate([i.codes for i in indexes])[order]
            self._merged = CodeIndex(ids, codes, index_type("flat"))
            self._merged_from = indexes
        return [self._merged]

    def _run(self, function, units: list[CodeIndex], n_queries: int) -> tuple[list, list]:
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

    def restrict(self, ids: np.ndarray) -> CodeIndex:
        """A flat index over the items among `ids` (sorted ids; absent ones are skipped) for `coarse(within=)`:
        a filtered search scans exactly the items that pass, as a brute force over them would."""
        ids = self._check_ids(ids)
        found_ids, found_codes = [], []
        for shard, rows in zip(self.shards, self._by_shard(ids)):
            shard.sync_index()
            positions, missing = find_sorted(shard.code_index.ids, ids[rows])
            found_ids.append(ids[rows][~missing])
            found_codes.append(shard.code_index.codes[positions[~missing]])
        ids, codes = np.concatenate(found_ids), np.concatenate(found_codes)
        order = np.argsort(ids, kind="stable")  # id order: ties come out broken by id
        codes = np.ascontiguousarray(codes[order])
        return CodeIndex(ids[order], codes, index_type("flat"))

    def _forget_filters(self) -> None:
        """After a refresh or a write: the filter indices describe the items as they were."""
        self._filters: FilterIndex | None = None
        self._filtered: dict[Filter, CodeIndex] = {}

    def filtered(self, rule: Filter) -> CodeIndex:
        """`restrict` to the items that pass `rule` (kept for the 16 rules used last; `refresh` forgets them)."""
        if rule not in self._filtered:
            if self._filters is None:
                self._filters = FilterIndex(self.metadata_items())
            if len(self._filtered) >= 16:
                self._filtered.pop(next(iter(self._filtered)))
            self._filtered[rule] = self.restrict(self._filters.allowed(rule))
        return self._filtered[rule]

    def metadata_items(self) -> Iterator[tuple[int, dict | None]]:
        """(id, metadata) of every item, shard by shard."""
        for shard in self.shards:
            yield from shard.metadata_items()

    def coarse(self, query_codes: np.ndarray, m: int | None = None, radius: int | None = None,
               within: CodeIndex | Filter | None = None, nprobe: int | None = None) -> list[Hits]:
        """Hamming stage. `m`: the m nearest codes; `radius`: every code within that distance (capped at m if
        both are given). Exact on a flat catalog: equal to one flat index over all items, ties broken by id; on
        an approximate one (ivf, hash) each shard's approximate top m, merged exactly. Radius search is exact on
        every type. `within`: only the items of this index (from `restrict`) or that pass this filter, exactly.
        `nprobe`: inverted lists each shard visits (ivf; default: `shards.index.default_nprobe`)."""
        if isinstance(within, Filter):
            within = self.filtered(within) if within else None
        if m is None and radius is None:
            raise CatalogError("coarse search needs m (pool size) or radius")
        if m is not None and m < 1 or radius is not None and radius < 0:
            raise CatalogError(f"pool size must be >= 1 and radius >= 0, got m={m}, radius={radius}")
        if nprobe is not None and nprobe < 1:
            raise CatalogError(f"nprobe must be >= 1, got {nprobe}")
        queries = pad_codes(self._check_codes(query_codes, "query codes"), self.bits)
        units = self._search_units() if within is None else [within]
        if radius is None:
            tasks, parts = self._run(lambda t: t[0].search_knn(queries[t[1]], m, nprobe), units, len(queries))
            hits = self._merge_knn(parts, tasks, units, len(queries), m)
            if within is not None:  # positions in a subset are not the catalog's id order
                for h in hits:
                    h.positions = None
            return hits
        tasks, parts = self._run(lambda t: t[0].search_radius(queries[t[1]], radius), units, len(queries))
        return merge_hits(_per_query(tasks, parts, len(queries)), m)

    def _merge_knn(self, parts: list, tasks: list, units: list[CodeIndex], n_queries: int, m: int) -> list[Hits]:
        if len(units) == 1:  # one id-ordered index over every item: its positions are the catalog's id order
            (distances, found, positions), = parts
            return [Hits(i[i >= 0], d[i >= 0], positions=p[i >= 0]) for d, i, p in zip(distances, found, positions)]
        found = [[(d[i >= 0], i[i >= 0]) for d, i in zip(*part[:2])] for part in parts]
        return merge_hits(_per_query(tasks, found, n_queries), m)

    def rerank(self, query_features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        """Euclidean stage: the top k of each query's candidates by exact distance on stored features
        (ties by id)."""
        hits = self.rerank_squared(query_features, candidates, k)
        for h in hits:
            h.distances = np.sqrt(h.distances)
        return hits

    def rerank_squared(self, query_features: np.ndarray, candidates: list[Hits], k: int,
                       choose: Callable[[np.ndarray, np.ndarray, int], np.ndarray] = nearest) -> list[Hits]:
        """`rerank` with squared distances: what shard groups return, so that merging their answers orders by
        the same numbers a single catalog does. `choose(ids, squared, k)`: the positions of each pool to
        return, in order (the k nearest, or `shards.ranking.prefix_nearest` for a group's share)."""
        query_features = self._check_features(query_features, len(candidates)).astype(np.float32)
        results = []
        for query, hits in zip(query_features, candidates):
            if not len(hits):
                results.append(Hits(hits.ids, hits.hamming, np.empty(0, np.float32)))
                continue
            rows = self._feature_rows(hits.ids, hits.positions)
            squared = self._squared_distances(query, rows)
            order = choose(hits.ids, squared, k)
            if not np.isfinite(squared).all():
                self._check_rows(hits.ids, rows)  # names the damaged item
            self._check_rows(hits.ids[order], rows[order])  # what is returned is checked: ~1 us per result
            results.append(Hits(hits.ids[order], hits.hamming[order], squared[order]))
        return results

    def _squared_distances(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Squared L2 from one float32 query to stored feature rows, computed by Faiss on the stored bytes as
        they are (its SIMD fp16 path): ~2.5x faster than decoding to float32 and subtracting in numpy."""
        d = self.manifest.feature_dim
        if self.manifest.feature_dtype == "float16":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        else:
            index = faiss.IndexFlatL2(d)
        faiss.copy_array_to_vector(rows.reshape(-1), index.codes)
        index.ntotal = len(rows)
        distances, positions = index.search(query[None], len(rows))
        squared = np.empty(len(rows), np.float32)
        squared[positions[0]] = distances[0]
        return squared

    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None, k: int = 10,
               pool: int | None = None, radius: int | None = None, nprobe: int | None = None,
               within: CodeIndex | Filter | None = None) -> list[Hits]:
        """Two-stage search for a batch of queries: a Hamming pool (`pool` nearest codes, default 100*k, or
        every code within `radius`), re-ranked by Euclidean distance; Hamming order alone without features.
        `nprobe`, `within`: see `coarse`."""
        pool = pool_size(k, pool, radius)
        candidates = self.coarse(query_codes, m=pool, radius=radius, within=within, nprobe=nprobe)
        if query_features is None:
            return [Hits(h.ids[:k], h.hamming[:k]) for h in candidates]
        return self.rerank(query_features, candidates, k)
