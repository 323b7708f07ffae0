"""Helper for test_crash: add deterministic batches to a catalog, printing each batch number once committed."""
import sys

import numpy as np

from shards import Catalog

BATCH, FEATURE_DIM, BITS = 2000, 64, 48


def batch(number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(number)
    ids = np.arange(number * BATCH, (number + 1) * BATCH, dtype=np.int64) * 7919 % (2**40)
    codes = rng.integers(0, 256, (BATCH, BITS // 8), dtype=np.uint8)
    features = rng.standard_normal((BATCH, FEATURE_DIM)).astype(np.float32)
    return ids, codes, features, [{"batch": number, "i": i} for i in range(BATCH)]


def main() -> None:
    path, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        catalog = Catalog.open(path, readonly=False)
    except Exception:
        catalog = Catalog.create(path, BITS, FEATURE_DIM, shards=3)
    for number in range(first, last):
        catalog.add(*batch(number))
        print(number, flush=True)
    catalog.close()


if __name__ == "__main__":
    main()
