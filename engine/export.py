"""HDF5 export and import of a catalog's items: `python -m engine.export --catalog DIR --out FILE.h5`.

Datasets `ids`, `codes` (packed uint8), `features`, `labels` (-1 where none; names in attribute `label_names`),
`paths` (UTF-8); attributes `bits` and `model_fingerprint`. `--import FILE.h5` bulk-loads such a file, so codes
computed elsewhere (a GPU box, a cluster) can be indexed here.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from engine.errors import run_cli
from shards import Catalog
from training.errors import UserError

BATCH = 50_000


def export_catalog(catalog_dir: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> int:
    """Write every item of the catalog to an HDF5 file; returns the item count."""
    with Catalog.open(catalog_dir, readonly=True) as catalog:
        n, manifest = len(catalog), catalog.manifest
        label_names: dict[str, int] = {}
        with h5py.File(out, "w") as f:
            f.attrs["bits"] = manifest.bits
            f.attrs["model_fingerprint"] = manifest.model_fingerprint or ""
            ids = f.create_dataset("ids", (n,), dtype=np.int64)
            codes = f.create_dataset("codes", (n, manifest.layout.code_bytes), dtype=np.uint8)
            features = f.create_dataset("features", (n, manifest.feature_dim), dtype=manifest.feature_dtype)
            labels = f.create_dataset("labels", (n,), dtype=np.int64)
            paths = f.create_dataset("paths", (n,), dtype=h5py.string_dtype("utf-8"))
            items = iter(tqdm(catalog, total=n, desc="exporting", unit="item", disable=not progress))
            for start in range(0, n, BATCH):  # write in slices: per-row HDF5 writes are ~100x slower
                chunk = [next(items) for _ in range(min(BATCH, n - start))]
                part = slice(start, start + len(chunk))
                metas = [item.meta or {} for item in chunk]
                ids[part] = [item.id for item in chunk]
                codes[part] = np.stack([item.code for item in chunk])
                features[part] = np.stack([item.features for item in chunk])
                labels[part] = [-1 if m.get("label") is None
                                else label_names.setdefault(str(m["label"]), len(label_names)) for m in metas]
                paths[part] = [m.get("path") or "" for m in metas]
            f.attrs["label_names"] = list(label_names)
    return n


def import_hdf5(file: str | os.PathLike, catalog_dir: str | os.PathLike, shards: int = 4, index: str = "flat",
                progress: bool = True) -> int:
    """Bulk-load an HDF5 file (the export format) into a catalog, creating it if needed; returns items added."""
    if not Path(file).is_file():
        raise UserError(f"no such HDF5 file: {file}")
    with h5py.File(file, "r") as f:
        missing = [d for d in ("ids", "codes", "features") if d not in f]
        if missing or "bits" not in f.attrs:
            raise UserError(f"{file} lacks {', '.join(missing) or 'the bits attribute'}; not a latenthash export")
        bits, fingerprint = int(f.attrs["bits"]), str(f.attrs.get("model_fingerprint", "")) or None
        names = [str(n) for n in f.attrs.get("label_names", [])]
        n, dim = f["features"].shape
        if (Path(catalog_dir) / "manifest.json").exists():
            catalog = Catalog.open(catalog_dir, readonly=False, model_fingerprint=fingerprint)
        else:
            catalog = Catalog.create(catalog_dir, bits=bits, feature_dim=dim, shards=shards, index=index,
                                     model_fingerprint=fingerprint)
        with catalog, tqdm(total=n, desc="importing", unit="item", disable=not progress) as bar:
            for start in range(0, n, BATCH):
                part = slice(start, min(n, start + BATCH))
                labels = f["labels"][part] if "labels" in f else np.full(part.stop - start, -1)
                paths = f["paths"].asstr()[part] if "paths" in f else [""] * (part.stop - start)
                metas = [dict(path=p or None, label=(names[l] if 0 <= l < len(names) else int(l)) if l >= 0 else None)
                         for p, l in zip(paths, labels)]
                catalog.add(f["ids"][part], f["codes"][part], f["features"][part], metas)
                bar.update(part.stop - start)
    return n


EXAMPLES = """examples:
  python -m engine.export --catalog catalogs/shop --out shop.h5
  python -m engine.export --import shop.h5 --catalog catalogs/shop-copy --shards 8
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory to export (or to import into)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="HDF5 file to write")
    action.add_argument("--import", dest="import_file", metavar="FILE", help="HDF5 file to load into --catalog")
    parser.add_argument("--shards", type=int, default=4, help="shards, when --import creates the catalog")
    parser.add_argument("--index", choices=("flat", "hash"), default="flat")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.out:
            n = export_catalog(args.catalog, args.out)
            print(f"exported {n} items to {args.out}")
        else:
            n = import_hdf5(args.import_file, args.catalog, args.shards, args.index)
            print(f"imported {n} items into {args.catalog}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
