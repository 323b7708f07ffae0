"""The hashing network and how it learns: `create_model`, `load_model`, `save_model`, and `training.train`.

Names are loaded on first use (PEP 562): the command-line tools answer `--help` without importing torch.
"""
from __future__ import annotations

import importlib

__all__ = ["HashingNet", "ModelConfig", "create_model", "load_model", "save_model"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module("training.model"), name)
