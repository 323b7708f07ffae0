"""The catalog's small files, written durably, and its two locks.

A file is replaced atomically and durably: the new bytes are fsynced, renamed over the old file, and the folder
is fsynced, so a crash leaves the old file or the new one, never a mix or nothing. One writer at a time holds
`writer.lock`; `commit.lock` is taken exclusively while a writer commits a batch's shards and shared while a
reader takes its snapshots, so a reader sees each batch in every shard or in none.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Iterator

from shards.errors import CatalogError, WriterBusyError

WRITER_LOCK = "writer.lock"
COMMIT_LOCK = "commit.lock"

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


def write_atomic(file: Path, data: bytes) -> None:
    """Replace `file` with `data`, durably (see the module's docstring); CatalogError names the file."""
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


def take_writer_lock(folder: Path) -> IO:
    """Hold the catalog's writer lock (released by `release_writer_lock`); WriterBusyError if a process has it."""
    try:
        lock_file = open(folder / WRITER_LOCK, "a")
    except OSError as error:
        raise CatalogError(f"{folder / WRITER_LOCK}: cannot open for writing ({error.strerror})") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise WriterBusyError(f"{folder / WRITER_LOCK}: another process is writing this catalog") from None
    _HELD_LOCKS.add(lock_file.fileno())
    return lock_file


def release_writer_lock(lock_file: IO) -> None:
    _HELD_LOCKS.discard(lock_file.fileno())
    lock_file.close()


@contextlib.contextmanager
def commit_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Writers commit under the exclusive lock, readers take snapshots under the shared one."""
    try:
        fd = os.open(folder / COMMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
