"""build-index: turn a directory of images into a searchable catalog, incrementally.

Re-running skips files already indexed and unchanged (path, size, mtime), re-encodes changed ones, and with
--prune removes items whose files are gone. Each batch is committed atomically, so a killed build resumes
where it stopped with no duplicates and nothing lost.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.encode import encode_files, pick_device
from engine.errors import run_cli
from shards import Catalog
from training.errors import UserError
from training.images import list_images
from training.model import load_model

ENGINE_FILE = "engine.json"  # which model a catalog's codes came from, for queries
REPORT_FILE = "build-report.json"


@dataclass
class BuildSummary:
    found: int = 0
    indexed: int = 0
    unchanged: int = 0
    reindexed: int = 0
    pruned: int = 0
    failed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    failures: list[dict] = field(default_factory=list)


def item_id(path: Path) -> int:
    """A stable 63-bit id from the absolute path: the same file always maps to the same item."""
    return int.from_bytes(hashlib.blake2b(str(path).encode(), digest_size=8).digest(), "big") >> 1


def label_of(path: Path, root: Path) -> str | None:
    """The first subfolder under the root is the label (class) when the layout has one."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def open_or_create_catalog(catalog_dir: Path, model, shards: int, index: str) -> Catalog:
    if (catalog_dir / "manifest.json").exists():
        catalog = Catalog.open(catalog_dir, readonly=False, model_fingerprint=model.fingerprint)
        if catalog.bits != model.config.bits or catalog.manifest.feature_dim != model.config.feature_dim:
            catalog.close()
            raise UserError(f"catalog {catalog_dir} holds {catalog.bits}-bit codes with "
                            f"{catalog.manifest.feature_dim}-d features; model has {model.config.bits} bits, "
                            f"{model.config.feature_dim}-d")
        return catalog
    return Catalog.create(catalog_dir, bits=model.config.bits, feature_dim=model.config.feature_dim,
                          shards=shards, index=index, model_fingerprint=model.fingerprint)


def build_index(image_dir: str | os.PathLike, model_dir: str | os.PathLike, catalog_dir: str | os.PathLike,
                shards: int = 4, index: str = "flat", batch_size: int = 256, workers: int | None = None,
                device: str = "auto", prune: bool = False, progress: bool = True) -> BuildSummary:
    started = time.perf_counter()
    root = Path(image_dir).resolve()
    if not root.is_dir():
        raise UserError(f"image directory {image_dir} does not exist or is not a directory")
    files = list_images(root)
    if not files:
        raise UserError(f"no images (jpg, png, webp, bmp, tiff, gif) under {image_dir}")
    model = load_model(model_dir, device=pick_device(device))
    catalog_dir = Path(catalog_dir)
    summary = BuildSummary(found=len(files))
    with open_or_create_catalog(catalog_dir, model, shards, index) as catalog:
        (catalog_dir / ENGINE_FILE).write_text(json.dumps(
            {"model_dir": str(Path(model_dir).resolve()), "model_fingerprint": model.fingerprint}, indent=2) + "\n")
        ids = np.array([item_id(f) for f in files], dtype=np.int64)
        stats = [f.stat() for f in files]
        todo, changed = [], []
        known = catalog.metadata(ids) if len(catalog) else [None] * len(ids)
        for position, (meta, st) in enumerate(zip(known, stats)):
            if meta is None:
                todo.append(position)
            elif (meta.get("size"), meta.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
                summary.unchanged += 1
            else:
                todo.append(position)
                changed.append(position)
        if changed:
            catalog.delete(ids[changed])
            summary.reindexed = len(changed)
        if prune:
            summary.pruned = _prune(catalog, root, set(ids.tolist()))
        todo_files = [files[p] for p in todo]
        bar = tqdm(total=len(todo_files), desc="indexing", unit="img", disable=not progress)
        encode_start = time.perf_counter()
        with torch.inference_mode():
            for batch in encode_files(model, todo_files, batch_size, workers):
                positions = [todo[p] for p in batch.positions]
                metas = [dict(path=str(files[p]), label=label_of(files[p], root), size=stats[p].st_size,
                              mtime_ns=stats[p].st_mtime_ns) for p in positions]
                if positions:
                    catalog.add(ids[positions], batch.codes, batch.features, metas)
                summary.indexed += len(positions)
                summary.failures += [dict(path=str(todo_files[p]), error=e) for p, e in batch.failures]
                bar.update(len(batch.positions) + len(batch.failures))
                rate = (summary.indexed + len(summary.failures)) / (time.perf_counter() - encode_start)
                bar.set_postfix(img_s=f"{rate:.0f}", failed=len(summary.failures))
        bar.close()
    summary.failed = len(summary.failures)
    summary.seconds = round(time.perf_counter() - started, 2)
    if todo_files:
        summary.images_per_second = round(len(todo_files) / (time.perf_counter() - encode_start), 1)
    (catalog_dir / REPORT_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _prune(catalog: Catalog, root: Path, present: set[int]) -> int:
    """Delete items under `root` whose files no longer exist."""
    gone = [item.id for item in catalog if item.id not in present and item.meta
            and Path(item.meta.get("path", "")).is_relative_to(root) and not Path(item.meta["path"]).exists()]
    return catalog.delete(np.array(gone, dtype=np.int64)) if gone else 0


EXAMPLES = """examples:
  build-index photos/ --model models/shop48 --catalog catalogs/shop
  build-index photos/ --model models/shop48 --catalog catalogs/shop --shards 8 --workers 4 --prune
  python -m engine.build_index ../shared/data/cifar10-sample-png --model models/cifar48 --catalog /tmp/cat
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build-index", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="directory of images, searched recursively")
    parser.add_argument("--model", required=True, help="model directory written by training.train")
    parser.add_argument("--catalog", required=True, help="catalog directory (created if missing)")
    parser.add_argument("--shards", type=int, default=4, help="shards of a new catalog (default %(default)s)")
    parser.add_argument("--index", choices=("flat", "hash"), default="flat",
                        help="Faiss index of a new catalog: exact flat scan (default) or IndexBinaryHash")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding worker processes (default: 0 on 2 cores, else half the cores)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--prune", action="store_true", help="remove items whose image files are gone")
    args = parser.parse_args(argv)

    def body() -> int:
        summary = build_index(args.image_dir, args.model, args.catalog, args.shards, args.index, args.batch_size,
                              args.workers, args.device, args.prune)
        print(f"indexed {summary.indexed}, unchanged {summary.unchanged}, re-indexed {summary.reindexed}, "
              f"pruned {summary.pruned}, failed {summary.failed} of {summary.found} images in "
              f"{summary.seconds:.1f}s ({summary.images_per_second:.0f} img/s)")
        if summary.failed:
            print(f"failed files are listed in {Path(args.catalog) / REPORT_FILE}", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
