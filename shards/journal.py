"""The add journal (`add.journal`): what makes a batch all-or-nothing across shards.

Before a batch's first shard commits, the writer records the batch's ids and each shard's slot count; after the
last, it removes the record. A writer killed in between leaves it, and the next writer rolls the batch back: it
deletes the journal's ids that hold slots at or past those counts (items the batch added), and refuses, deleting
nothing, if the journal names items that were there before it. Readers never write: they leave that part of the
batch out of what they answer until a writer has rolled it back.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from shards.errors import CatalogError, DamagedError
from shards.files import write_atomic

if TYPE_CHECKING:
    from shards.shard_set import ShardSet

JOURNAL = "add.journal"
JOURNAL_MAGIC = b"LHJRNL02"  # then the shard count, each shard's slots used before the batch (-1: not held), ids


class Journal:
    """The journal of the catalog whose shards `store` holds (all of them, or a node's share)."""

    def __init__(self, store: ShardSet):
        self.store = store
        self.file = store.path / JOURNAL

    def exists(self) -> bool:
        return os.path.lexists(self.file)

    def write(self, ids: np.ndarray) -> None:
        """Name the batch about to be committed, and where each shard's slots stood before it."""
        before = np.full(self.store.manifest.shard_count, -1, np.int64)
        for shard in self.store.shards:
            before[shard.number] = shard.slots_used()
        write_atomic(self.file, JOURNAL_MAGIC + np.int64(len(before)).tobytes() + before.tobytes() + ids.tobytes())

    def remove(self) -> None:
        self.file.unlink()

    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(the ids a cut-short batch names, each shard's slots used before it or None for a journal of an older
        latenthash, which did not record them). Written atomically by `write`: anything else is damage."""
        shard_count = self.store.manifest.shard_count
        damaged = f"{self.file}: damaged"
        advice = "it names the items of a batch that was cut short: compare with build-report.json, or delete it"
        try:
            if not self.file.is_file():
                raise DamagedError(f"{damaged} (not a regular file); {advice}")
            raw = self.file.read_bytes()
        except OSError as error:
            raise DamagedError(f"{self.file}: cannot be read ({error.strerror or error})") from None
        header = len(JOURNAL_MAGIC) + 8
        if raw.startswith(JOURNAL_MAGIC) and len(raw) >= header:
            count = int.from_bytes(raw[len(JOURNAL_MAGIC):header], "little")
            if count != shard_count or (len(raw) - header) % 8 or len(raw) < header + 8 * count:
                raise DamagedError(f"{damaged} ({len(raw)} bytes, not a journal of {shard_count} shards); {advice}")
            before = np.frombuffer(raw, np.int64, count, header)
            ids = np.frombuffer(raw, np.int64, offset=header + 8 * count)
        elif len(raw) % 8:
            raise DamagedError(f"{damaged} ({len(raw)} bytes, not whole 8-byte ids); {advice}")
        else:
            before, ids = None, np.frombuffer(raw, np.int64)
        if len(ids) and ids.min() < 0:
            raise DamagedError(f"{damaged} (negative ids); {advice}")
        return ids, before

    def cut_short_batch(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """The ids the journal names; per held shard, those its batch added there; and those the catalog held
        before the batch. A shard took the batch if its slot count grew by exactly the batch's share since the
        journal was written, and then the batch's items hold the slots past the old count; any other present
        id was there before (or the journal is not this catalog's)."""
        ids, before = self.read()
        added, older = [], []
        for shard, rows in zip(self.store.shards, self.store.by_shard(ids)):
            present, slots = shard.slots_of(ids[rows])
            floor = int(before[shard.number]) if before is not None else -1
            took_batch = floor >= 0 and shard.slots_used() == floor + len(rows)
            new = present & (slots >= floor) if took_batch else np.zeros(len(rows), bool)
            added.append(ids[rows][new])
            older.append(ids[rows][present & ~new])
        return ids, added, np.concatenate(older)

    def hide_cut_short_batch(self) -> int:
        """Readers leave out what a killed writer committed of its last batch (the next writer rolls it back),
        so they see whole batches; returns how many items that hides. A damaged journal hides nothing (`problem`
        reports it)."""
        if not self.exists():
            return 0
        try:
            _, added, _ = self.cut_short_batch()
        except CatalogError:
            return 0
        for shard, ids in zip(self.store.shards, added):
            if len(ids):
                shard.hide(ids)
        return sum(len(ids) for ids in added)

    def roll_back(self) -> None:
        """Undo a batch cut short, so adds stay all-or-nothing (writers). Items the journal names that were there
        before its batch are never deleted: the rollback is refused."""
        if not self.exists():
            return
        ids, added, older = self.cut_short_batch()
        self.store.check_held(ids, f"the cut-short batch in {self.file}")
        if len(older):
            raise DamagedError(f"{self.file}: names {len(older)} items that were in the catalog before its batch "
                               f"(ids {older[:10].tolist()}); rolling it back would delete them, so nothing was "
                               "rolled back. It is damaged, from an older latenthash or not this catalog's: if no "
                               "batch was cut short, delete it")
        for shard, batch in zip(self.store.shards, added):
            if len(batch):
                shard.delete(batch)
        self.remove()

    def problem(self, readonly: bool, hidden: int = 0) -> str | None:
        """What the journal means for this catalog, in words (None without one); `hidden`: the items a reader
        leaves out of its answers because of it."""
        if not self.exists():
            return None
        try:
            _, added, older = self.cut_short_batch()
        except CatalogError as error:
            return str(error)
        if len(older):
            return (f"names {len(older)} items that were in the catalog before its batch (ids {older[:10].tolist()}): "
                    "a rollback is refused; if no batch was cut short, delete it")
        committed = sum(len(ids) for ids in added) + hidden
        return (f"a batch cut short is still to be rolled back ({committed} of its items were committed"
                + (", left out of searches" if readonly else "") + "); a repair by engine.verify rolls it back")
