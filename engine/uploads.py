"""Photos added through the service, kept in the catalog folder's `uploads/` under a name made from their bytes.

A photo is written (to a temporary name, then renamed) before its item is committed, and deleted after its item
is: a kill in between leaves a photo no item refers to. Those orphans are found by id (an item's id is the hash
of its photo's path) and removed by the service when it opens the catalog for writing, or by
`engine.verify --repair`; `engine.verify` reports them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from engine.record import item_id, read_record
from shards.errors import CatalogError
from training.files import atomic_write

UPLOADS = "uploads"


def uploads_folder(catalog_dir: str | os.PathLike) -> Path:
    return (Path(catalog_dir) / UPLOADS).resolve()


def upload_file(catalog_dir: str | os.PathLike, data: bytes) -> Path:
    """Where a photo with these bytes is kept: the same photo is always the same file, and so the same item."""
    return uploads_folder(catalog_dir) / hashlib.sha256(data).hexdigest()[:24]


def keep_upload(file: Path, data: bytes) -> None:
    """Write the photo whole or not at all: a full disk leaves no partial or empty file under its name."""
    atomic_write(file, lambda tmp: tmp.write_bytes(data))


def is_upload(catalog_dir: str | os.PathLike, path: str | None) -> bool:
    """Whether an item's stored path is a photo this catalog keeps (the only files the service may delete)."""
    return bool(path) and Path(path).parent == uploads_folder(catalog_dir)


def orphan_uploads(catalog_dir: str | os.PathLike, catalog) -> list[Path]:
    """Files in the uploads folder that belong to no item of `catalog`. Nothing, if the folder is not the one
    the catalog recorded (a moved catalog: its items' ids come from the old paths, and its photos are not
    orphans)."""
    folder = uploads_folder(catalog_dir)
    try:
        record = read_record(catalog_dir)
    except CatalogError:  # a damaged engine.json, reported as such
        return []
    if not folder.is_dir() or record is None or str(folder) not in record.image_roots:
        return []
    files = sorted(path for path in folder.iterdir() if path.is_file())
    if not files:
        return []
    held = catalog.present(np.array([item_id(path) for path in files], dtype=np.int64))
    return [path for path, present in zip(files, held) if not present]


def remove_uploads(files: list[Path]) -> str:
    """Delete the files; says what was done, in one line."""
    for file in files:
        file.unlink(missing_ok=True)
    return f"removed {len(files)} uploaded photos that belonged to no item"
