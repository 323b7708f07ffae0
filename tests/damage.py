"""Damage made on purpose, as a crash or a hostile user would leave it: shared by the tests and the fault campaign
(benchmarks/hostile.py)."""
from __future__ import annotations

from pathlib import Path

import lmdb


def put_info(shard_folder: Path, key: bytes, value: bytes) -> None:
    """Change one record of a shard's info database with LMDB itself (no catalog open)."""
    env = lmdb.open(str(shard_folder), max_dbs=4)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(b"info", txn=txn))
    finally:
        env.close()
