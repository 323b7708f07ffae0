"""Writing files so that a crash leaves the old file or the new one, never a torn one, and a refused run leaves
nothing behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it over `path`, durably: the file's bytes are
    fsynced before the rename and the folder after it, so a crash or power loss leaves the old file or the new
    one, never a torn or empty one (as shards.files.write_atomic does for a catalog's files)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write(tmp_path)
        _fsync(tmp_path, os.O_RDONLY)
        os.replace(tmp_path, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def removed_on(errors: type[BaseException] | tuple[type[BaseException], ...], folder: Path) -> Iterator[None]:
    """What the block creates in `folder` (the folder itself when it is new) is removed if it raises `errors`:
    a refused run leaves no empty or half-written folder that the next run would then refuse."""
    existed = folder.is_dir()
    before = set(folder.iterdir()) if existed else set()
    try:
        yield
    except errors:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for entry in set(folder.iterdir()) - before:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise
