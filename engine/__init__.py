"""What users touch: build-index, queries (`engine.Searcher`), HDF5 export, the paper's metrics, the demo.

Names are loaded on first use (PEP 562): the command-line tools answer `--help` without importing torch.
"""
from __future__ import annotations

import importlib

__all__ = ["Result", "Searcher"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module("engine.search"), name)
