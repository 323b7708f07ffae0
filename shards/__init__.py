"""Storage and search: sharded Faiss binary indices with features, kept in LMDB.

Names are loaded on first use (PEP 562), so that importing `shards.errors` does not import Faiss: command-line
tools answer `--help` without loading their heavy dependencies.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Catalog": "shards.catalog", "Item": "shards.catalog", "catalog_exists": "shards.catalog",
            "open_or_create": "shards.catalog", "remove_catalog_files": "shards.catalog",
            "CatalogReader": "shards.reader", "StageTimings": "shards.reader", "Hits": "shards.ranking",
            "Manifest": "shards.manifest", "hamming_distances": "shards.codes", "pad_codes": "shards.codes",
            "CatalogError": "shards.errors", "InvalidArgumentError": "shards.errors",
            "DuplicateIdError": "shards.errors", "DamagedError": "shards.errors", "WriterBusyError": "shards.errors",
            "Filter": "shards.filters"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
