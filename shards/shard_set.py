"""The shards of one catalog opened together, and what every part of the catalog does with them: route an id to
the shard that holds it (`id % shard_count`), check what callers hand in, and read per id from the owners.

Shards are opened (and readers refreshed) under the commit lock, together with what a batch cut short by a killed
writer calls for (`shards.journal`): a writer rolls it back, a reader leaves its items out. So every part of the
catalog sees whole batches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shards.errors import CatalogError, InvalidArgumentError
from shards.files import commit_lock, write_atomic
from shards.journal import Journal
from shards.manifest import MANIFEST, Manifest
from shards.shard import Shard

COUNTS = "counts.json"  # items per shard when a writer last flushed: what a lost shard file held


class ShardSet:
    def __init__(self, path: Path, manifest: Manifest, readonly: bool, shard_numbers: Sequence[int] | None = None,
                 writer_may_join: bool = False, create: bool = False, repair: bool = False):
        """Open the shards `shard_numbers` (default: all). `create`: a new catalog, whose shard files are made.
        `repair` (writers): shard counters are rewritten from the records and a shard whose data file is lost is
        made again, empty; `repairs` lists what was rewritten, `lost` the shards made again (and what they held).
        Writers hold the writer lock."""
        self.path, self.manifest, self.readonly = path, manifest, readonly
        self.shards: list[Shard] = []
        self._id_order: tuple[list, np.ndarray] | None = None
        extra = sorted(p.name for p in path.glob("shard-*")
                       if not (p.name[6:].isdigit() and int(p.name[6:]) < manifest.shard_count))
        if extra:
            raise CatalogError(f"{path / MANIFEST}: says {manifest.shard_count} shards, but {', '.join(extra)} "
                               "also exist: the manifest does not match the catalog")
        held = range(manifest.shard_count) if shard_numbers is None else sorted(set(shard_numbers))
        if shard_numbers is not None and not all(0 <= i < manifest.shard_count for i in held):
            raise InvalidArgumentError(f"{path}: shards are numbered 0..{manifest.shard_count - 1}; got "
                                       f"{list(shard_numbers)}")
        lost = [i for i in held if not create and self._lost_data_file(i, readonly or not repair)]
        self.lost = {i: self.lost_items(i) for i in lost}
        self.journal = Journal(self)
        try:
            with commit_lock(path, exclusive=not readonly):
                for i in held:
                    self.shards.append(Shard(path / f"shard-{i:04d}", manifest.layout, readonly, i,
                                             manifest.shard_count, writer_may_join, create or i in self.lost, repair))
                self.hidden = self.journal.hide_cut_short_batch() if readonly else 0  # items left out
                if not readonly:
                    self.journal.roll_back()
        except BaseException:
            self.close_shards()
            raise

    def refresh_shards(self) -> None:
        """Readers: new snapshots of every shard, taken together."""
        with commit_lock(self.path, exclusive=False):
            for shard in self.shards:
                shard.refresh()
            self.hidden = self.journal.hide_cut_short_batch()

    def _lost_data_file(self, number: int, refuse: bool) -> bool:
        """Whether shard `number`'s data file is missing; `refuse`: raise instead, saying what it held."""
        data_file = self.path / f"shard-{number:04d}" / "data.mdb"
        if data_file.is_file():
            return False
        if refuse:
            raise CatalogError(f"{data_file}: shard data file is missing ({self.lost_items(number)}); restore it "
                               "from a backup, or let engine.verify repair the catalog to start the shard again "
                               "empty")
        return True

    def lost_items(self, number: int) -> str:
        """What shard `number` held, in words, from the counts the last writer recorded."""
        count = self._recorded_counts().get(f"shard-{number:04d}")
        return f"it held {count} items when a writer last closed the catalog" if count is not None \
            else "how many items it held is not recorded"

    def _recorded_counts(self) -> dict[str, int]:
        """Items per shard folder as the last writer recorded them; advisory, so a damaged file reads as empty."""
        try:
            counts = json.loads((self.path / COUNTS).read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(counts, dict):
            return {}
        return {k: v for k, v in counts.items() if type(v) is int and v >= 0}

    def record_counts(self) -> None:
        """Keep each shard's item count beside the manifest, so a shard file lost later says what was lost."""
        recorded = self._recorded_counts()
        counts = dict(recorded, **{shard.path.name: len(shard) for shard in self.shards})
        if counts != recorded:
            write_atomic(self.path / COUNTS, (json.dumps(counts, indent=1, sort_keys=True) + "\n").encode())

    @property
    def repairs(self) -> list[tuple[str, str]]:
        """(shard folder, what was wrong) for each shard counter a repairing open rewrote."""
        return [(shard.path.name, problem) for shard in self.shards for problem in shard.repairs]

    def close_shards(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards = []

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def by_shard(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each held shard, the positions in `ids` of the items it holds."""
        owner = ids % self.manifest.shard_count
        return [np.flatnonzero(owner == shard.number) for shard in self.shards]

    def fetch(self, ids: np.ndarray, read: Callable[[Shard, np.ndarray], list]) -> list:
        """Per id (in order), what `read(shard, ids)` returns from the shard that owns it (None if not held)."""
        found: list = [None] * len(ids)
        for shard, rows in zip(self.shards, self.by_shard(ids)):
            if len(rows):
                for row, value in zip(rows, read(shard, ids[rows])):
                    found[row] = value
        return found

    def ids_in_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Every id sorted, and the order that sorts the shards' concatenated ids: shared by the merged index and
        the feature locator (sorting 10M ids takes ~1 s), redone when a shard's index changes."""
        indexes = [shard.code_index for shard in self.shards]
        if self._id_order is None or any(a is not b for a, b in zip(self._id_order[0], indexes)):
            order = np.argsort(np.concatenate([i.ids for i in indexes]), kind="stable")
            self._id_order = indexes, order
        order = self._id_order[1]
        return np.concatenate([i.ids for i in indexes])[order], order

    # ------------------------------------------------------------------ what callers hand in
    def check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgumentError(f"{self.path}: ids must be a 1-D integer array")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise InvalidArgumentError(f"{self.path}: ids must be non-negative")
        return ids

    def check_codes(self, codes: np.ndarray, what: str = "codes") -> np.ndarray:
        codes = np.asarray(codes)
        width = self.manifest.layout.code_bytes
        if codes.ndim != 2 or codes.shape[1] != width or codes.dtype != np.uint8:
            raise InvalidArgumentError(f"{self.path}: {what} must be uint8 of shape (n, {width}) for "
                                       f"{self.manifest.bits}-bit codes, got {codes.dtype} {codes.shape}")
        return np.ascontiguousarray(codes)

    def check_features(self, features: np.ndarray, n: int) -> np.ndarray:
        features = np.asarray(features)
        if features.shape != (n, self.manifest.feature_dim) or not np.issubdtype(features.dtype, np.number):
            raise InvalidArgumentError(f"{self.path}: features must have shape ({n}, {self.manifest.feature_dim}), "
                                       f"and be numbers, got {features.dtype} {features.shape}")
        if not np.isfinite(features).all():  # NaN or inf: such an item is not even its own nearest neighbour
            rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
            raise InvalidArgumentError(f"{self.path}: features of rows {rows[:10].tolist()} are not finite (NaN "
                                       "or inf)")
        return features

    def check_held(self, ids: np.ndarray, what: str = "the ids") -> None:
        """A catalog opened on a subset of shards writes only their items."""
        if len(self.shards) < self.manifest.shard_count:
            others = sorted(set((ids % self.manifest.shard_count).tolist()) - {s.number for s in self.shards})
            if others:
                raise InvalidArgumentError(f"{self.path}: {what} belong to shards {others[:10]}, not opened here "
                                           f"(shards {[s.number for s in self.shards]})")
