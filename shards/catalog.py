"""A catalog: a directory of shards plus a manifest, searched in two stages (Hamming, then Euclidean).

Item ids are non-negative 64-bit integers, unique across the catalog; an item lives in shard `id % shard_count`.
One writer at a time (a lock file); readers work from snapshots and see a write once they `refresh()`. Adds are
all-or-nothing across shards (`shards.journal`).

The catalog is put together from parts a reader can take one at a time: `ShardSet` (the shards opened together,
routing and argument checks), `HammingStage` (the coarse scans), `FeatureRows` (the re-ranking stage's reads),
`CatalogWriter` (adds, deletes, flushes; writers only). `CatalogReader` is the read contract it shares with the
catalog served by Ray actors, and holds the one two-stage `search`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from shards.codes import pad_codes
from shards.errors import CatalogError, InvalidArgumentError
from shards.files import COMMIT_LOCK, WRITER_LOCK, release_writer_lock, take_writer_lock
from shards.features import FeatureRows
from shards.filters import Filter
from shards.hamming import HammingStage
from shards.index import find_sorted
from shards.journal import JOURNAL
from shards.manifest import MANIFEST, Manifest
from shards.ranking import Hits, nearest
from shards.reader import CatalogReader
from shards.shard import Shard
from shards.shard_set import COUNTS, ShardSet
from shards.writer import CatalogWriter


@dataclass
class Item:
    id: int
    code: np.ndarray  # packed uint8
    features: np.ndarray  # float32
    meta: dict | None


class Catalog(ShardSet, CatalogReader):
    def __init__(self, path: Path, manifest: Manifest, readonly: bool, threads: int | None = None,
                 shard_numbers: Sequence[int] | None = None, writer_may_join: bool = False, create: bool = False,
                 repair: bool = False):
        """Use `open` or `create`. `threads`: Faiss threads per search (default: two per shard, at most the
        cores). The other arguments: see `ShardSet`."""
        lock_file = None if readonly else take_writer_lock(path)
        try:
            super().__init__(path, manifest, readonly, shard_numbers, writer_may_join, create, repair)
        except BaseException:
            if lock_file is not None:
                release_writer_lock(lock_file)
            raise
        self._writer = CatalogWriter(self, lock_file) if lock_file is not None else None
        self.threads = threads or min(manifest.shard_count * 2, os.cpu_count() or 1)
        self._hamming = HammingStage(self, self.threads)
        self._rows = FeatureRows(self)

    # ------------------------------------------------------------------ create / open / close
    @classmethod
    def create(cls, path: str | os.PathLike, bits: int, feature_dim: int, shard_count: int = 4,
               index: str = "flat", feature_dtype: str = "float16", model_fingerprint: str | None = None,
               hash_bits: int = 16, threads: int | None = None, block_items: int = 0, *,
               shards: int | None = None) -> "Catalog":
        """A new, empty catalog opened for writing. `block_items`: feature rows per LMDB block (default: 256 KiB
        worth). `shards`: the former name of `shard_count`, still accepted."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CatalogError(f"{path / MANIFEST}: a catalog already exists here")
        manifest = Manifest(bits=bits, feature_dim=feature_dim, shard_count=shard_count if shards is None else shards,
                            feature_dtype=feature_dtype, index_type=index, hash_bits=hash_bits,
                            model_fingerprint=model_fingerprint, block_items=block_items)
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
        catalog = cls(path, manifest, readonly=False, threads=threads, create=True)
        manifest.write(path)
        return catalog

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = True, model_fingerprint: str | None = None,
             threads: int | None = None, shard_numbers: Sequence[int] | None = None,
             writer_may_join: bool = False, repair: bool = False, *,
             shards: Sequence[int] | None = None) -> "Catalog":
        """Open an existing catalog; with `model_fingerprint`, refuse one whose codes another model made.
        `shard_numbers` (formerly `shards`, still accepted): only these shards, as one node of a cluster serves
        them; searches and reads then see only the items they hold, and a writer takes only their items (one
        writer at a time still). `writer_may_join`: a reader beside which this process may later open a writer.
        `repair` (writers): see `ShardSet`."""
        path = Path(path)
        shard_numbers = shard_numbers if shards is None else shards
        manifest = Manifest.read(path)
        if model_fingerprint is not None and manifest.model_fingerprint not in (None, model_fingerprint):
            raise CatalogError(f"{path / MANIFEST}: made by model {manifest.model_fingerprint}, not "
                               f"{model_fingerprint}; its codes are not comparable")
        if not readonly and shard_numbers is not None and os.path.lexists(path / JOURNAL):
            cls(path, manifest, readonly=False).close()  # a batch cut short: rolled back in every shard first
        return cls(path, manifest, readonly, threads, shard_numbers, writer_may_join, repair=repair)

    def close(self, flush: bool = True) -> None:
        """Store the search indices (writers, unless `flush` is False) and release everything, even if storing
        fails (a full disk): the committed items stay, and the next open rebuilds the indices from them."""
        self._rows.forget()
        self._hamming.close()
        try:
            if flush and self._writer is not None and self.shards:
                self._writer.flush()
        finally:
            self.close_shards()
            if self._writer is not None:
                self._writer.release()
                self._writer = None

    def __exit__(self, kind: type | None, *exc: object) -> None:
        try:
            self.close()
        except CatalogError:
            if kind is None:  # an error already on its way out says more than a failed flush after it
                raise

    def refresh(self) -> None:
        """Readers: see everything committed since opening (or the last refresh)."""
        self._rows.forget()
        self._hamming.forget_filters()
        self.refresh_shards()

    # ------------------------------------------------------------------ writes
    def _writing(self) -> CatalogWriter:
        """The writer, after forgetting what a write makes stale; CatalogError on a catalog opened read-only."""
        if self._writer is None:
            raise CatalogError(f"{self.path}: opened read-only")
        self._hamming.forget_filters()
        return self._writer

    def add(self, ids: Sequence[int] | np.ndarray, codes: np.ndarray, features: np.ndarray,
            metas: Sequence[dict] | None = None) -> None:
        """Add a batch: all of it or none, across shards, even if the process is killed midway."""
        self._writing().add(ids, codes, features, metas)

    def delete(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete items (absent ids are ignored); returns how many were removed."""
        return self._writing().delete(ids)

    def flush(self) -> None:
        """Store the search indices, so that the next open needs no rebuild."""
        self._writing().flush()

    def rebuild_indices(self) -> None:
        """Rebuild every shard's search index from its item records and store it (what a repair does)."""
        self._writing().rebuild_indices()

    # ------------------------------------------------------------------ reads
    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """Full items (None for absent ids)."""
        ids = self.check_ids(ids)
        codes = self.fetch(ids, Shard.codes)
        metas = self.fetch(ids, Shard.metas)
        present = np.array([c is not None for c in codes], bool)
        features = iter(self._rows.read(ids[present]))
        return [Item(int(i), np.frombuffer(c, np.uint8).copy(), next(features), m) if c is not None else None
                for i, c, m in zip(ids, codes, metas)]

    def metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict | None]:
        """Metadata of the given ids (None for absent ids or items stored without any)."""
        return self.fetch(self.check_ids(ids), Shard.metas)

    def metadata_items(self) -> Iterator[tuple[int, dict | None]]:
        """(id, metadata) of every item, shard by shard."""
        for shard in self.shards:
            yield from shard.metadata_items()

    def features(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 features of the given ids, read straight from LMDB (only these records) and checked against
        their checksums."""
        return self._rows.read(self.check_ids(ids))

    def codes(self, filter: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See `CatalogReader.codes`: from the in-memory indices, no disk read."""
        if filter:
            index = self._hamming.filtered(filter)
            return index.ids, index.codes
        for shard in self.shards:
            shard.sync_index()
        ids, order = self.ids_in_order()
        return ids, np.concatenate([shard.code_index.codes for shard in self.shards])[order]

    def present(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """A mask of the ids the catalog holds (from the in-memory indices: no disk read)."""
        ids = self.check_ids(ids)
        mask = np.zeros(len(ids), bool)
        for shard, positions in zip(self.shards, self.by_shard(ids)):
            if len(positions):
                shard.sync_index()
                mask[positions] = ~find_sorted(shard.code_index.ids, ids[positions])[1]
        return mask

    def __iter__(self) -> Iterator[Item]:
        """Every item, shard by shard, in id order within each shard."""
        for shard in self.shards:
            for item_id, code, features, meta in shard.iterate():
                yield Item(item_id, np.frombuffer(code, np.uint8).copy(), self._rows.decode(features, 1)[0], meta)

    def verify(self) -> Iterator[tuple[str, int | None, str]]:
        """Check every item against its checksum, feature row and metadata, and every shard's search index
        against its items: (shard folder name, item id or None, what is wrong) for each problem found."""
        for shard in self.shards:
            for item, problem in shard.verify():
                yield shard.path.name, item, problem
        journal = self.journal_problem()
        if journal is not None:
            yield JOURNAL, None, journal

    def journal_problem(self) -> str | None:
        """What a journal left by a killed writer means for this catalog, in words (None without one)."""
        return self.journal.problem(self.readonly, self.hidden)

    # ------------------------------------------------------------------ search
    def coarse(self, query_codes: np.ndarray, m: int | None = None, radius: int | None = None,
               filter: Filter | None = None, nprobe: int | None = None) -> list[Hits]:
        """See `CatalogReader.coarse`. Exact on a flat catalog: equal to one flat index over all items, ties
        broken by id; on an approximate one (ivf, hash) each shard's approximate top m, merged exactly. Radius
        search and filtered search are exact on every type."""
        if m is None and radius is None:
            raise InvalidArgumentError("coarse search needs m (pool size) or radius")
        if m is not None and m < 1 or radius is not None and radius < 0:
            raise InvalidArgumentError(f"pool size must be >= 1 and radius >= 0, got m={m}, radius={radius}")
        if nprobe is not None and nprobe < 1:
            raise InvalidArgumentError(f"nprobe must be >= 1, got {nprobe}")
        queries = pad_codes(self.check_codes(query_codes, "query codes"), self.bits)
        return self._hamming.search(queries, m, radius, filter, nprobe)

    def rerank(self, query_features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        hits = self.rerank_squared(query_features, candidates, k)
        for h in hits:
            h.distances = np.sqrt(h.distances)
        return hits

    def rerank_squared(self, query_features: np.ndarray, candidates: list[Hits], k: int,
                       choose: Callable[[np.ndarray, np.ndarray, int], np.ndarray] = nearest) -> list[Hits]:
        """`rerank` with squared distances: what shard groups return, so that merging their answers orders by
        the same numbers a single catalog does. `choose(ids, squared, k)`: the positions of each pool to
        return, in order (the k nearest, or `shards.ranking.prefix_nearest` for a group's share)."""
        query_features = self.check_features(query_features, len(candidates)).astype(np.float32)
        results = []
        for query, hits in zip(query_features, candidates):
            if not len(hits):
                results.append(Hits(hits.ids, hits.hamming, np.empty(0, np.float32)))
                continue
            rows = self._rows.rows(hits.ids, hits.positions)
            squared = self._rows.squared_distances(query, rows)
            order = choose(hits.ids, squared, k)
            if not np.isfinite(squared).all():
                self._rows.check(hits.ids, rows)  # names the damaged item
                self._rows.check_finite(hits.ids, rows)
            self._rows.check(hits.ids[order], rows[order])  # what is returned is checked: ~1 us per result
            results.append(Hits(hits.ids[order], hits.hamming[order], squared[order]))
        return results


def catalog_exists(path: str | os.PathLike) -> bool:
    """Whether `path` holds a catalog (its manifest); `Manifest.read` says whether it is a sound one."""
    return (Path(path) / MANIFEST).exists()


def open_or_create(path: str | os.PathLike, bits: int, feature_dim: int, shard_count: int = 4, index: str = "flat",
                   model_fingerprint: str | None = None) -> Catalog:
    """A writer on the catalog at `path`, created with these arguments if there is none there; an existing one
    must hold codes of `bits` and features of `feature_dim` (InvalidArgumentError otherwise), made by the model
    `model_fingerprint` if it records one (CatalogError otherwise)."""
    if not catalog_exists(path):
        return Catalog.create(path, bits, feature_dim, shard_count, index, model_fingerprint=model_fingerprint)
    catalog = Catalog.open(path, readonly=False, model_fingerprint=model_fingerprint)
    if (catalog.bits, catalog.manifest.feature_dim) != (bits, feature_dim):
        catalog.close()
        raise InvalidArgumentError(f"{path}: holds {catalog.bits}-bit codes with {catalog.manifest.feature_dim}-d "
                                   f"features, not {bits}-bit codes with {feature_dim}-d features")
    return catalog


def remove_catalog_files(path: str | os.PathLike) -> None:
    """Delete what the storage layer keeps in `path` (shards, manifest, locks, counts, journal), leaving the
    folder and anything else in it: what undoing a catalog's creation needs."""
    path = Path(path)
    for shard_folder in path.glob("shard-*"):
        shutil.rmtree(shard_folder, ignore_errors=True)
    for name in (MANIFEST, WRITER_LOCK, COMMIT_LOCK, COUNTS, JOURNAL):
        (path / name).unlink(missing_ok=True)
