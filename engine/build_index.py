"""build-index: turn a directory of images into a searchable catalog, incrementally.

Re-running skips files already indexed and unchanged (path, size, mtime), re-encodes changed ones, and with
--prune removes items whose files are gone. Each batch is committed atomically, so a killed build resumes
where it stopped with no duplicates and nothing lost.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from typing import TYPE_CHECKING, Iterator

import numpy as np

from engine.record import (CODE_MAKER_FILE, CODES, EngineRecord, display_path, item_id, item_record, label_of,
                           model_config, read_metadata_file, read_record, regular_file_status, write_record)
from shards.codes import MAX_BITS
from shards.index import INDEX_TYPES, describe_index_types
from training.collapse import SAMPLE as SPREAD_SAMPLE, CodeSpread, code_spread
from engine.cli import bounded_int, program_name, run_cli
from engine.errors import InputError
from engine.inference import PATH_CHOICES, PATHS, check_path_name
from engine.fetch import (FetchPolicy, FetchReport, add_fetch_flags, add_url_sources, describe_fetching,
                          fetch_photos, fetch_policy, fetched_folder)
from training.hashers import SUPERVISED, fit_code_maker, save_code_maker
from training.images import list_images

if TYPE_CHECKING:  # the modules that import torch and Faiss load when a build starts, not for --help
    from engine.encode import EncodedBatch, Encoder
    from shards import Catalog

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
    images_per_second: float = 0.0  # from the start of encoding: start-up (workers, Ray actors) included
    first_batch_seconds: float = 0.0  # from the start of encoding to the first batch committed
    steady_images_per_second: float = 0.0  # after the first batch: the pipeline's rate, start-up excluded
    failures: list[dict] = field(default_factory=list)
    metadata_unmatched: list[dict] = field(default_factory=list)  # --metadata lines with no usable image
    fetched: dict | None = None  # image_url rows: engine.fetch.FetchReport.counts() (failures are in `failures`)
    codes: dict | None = None  # training.collapse.CodeSpread of the images indexed by this run
    inference_path: str = "eager"  # how the backbone ran (engine/inference.py)


def build_index(image_dir: str | os.PathLike, model_dir: str | os.PathLike, catalog_dir: str | os.PathLike,
                shards: int = 4, index: str = "flat", batch_size: int = 256, workers: int | None = None,
                device: str = "auto", prune: bool = False, progress: bool = True, codes: str | None = None,
                code_bits: int | None = None, fit_samples: int = 20000,
                metadata: str | os.PathLike | None = None, ray: str | None = None,
                fetch: FetchPolicy = FetchPolicy(), inference_path: str = "auto") -> BuildSummary:
    """Index (or update) a catalog. `codes` = latent (the model's codes) or a code maker of training.hashers,
    fitted on the model's features of a new catalog and kept with it; an existing catalog keeps its own.
    `metadata`: a JSON-lines file of product metadata, one object per image with its `path` under `image_dir`
    or its `image_url` (fetched as `fetch` says, kept in the catalog folder: a re-run fetches only new URLs);
    an item whose metadata changed is indexed again. `ray`: a Ray address (`local`, `auto`, HOST:PORT) whose
    actors decode and encode (`workers` of them; default one per GPU, else per CPU) while this process commits.
    `inference_path`: how the backbone runs (engine/inference.py; `auto` = the measured best here); a catalog
    keeps the path its codes were made by."""
    started = time.perf_counter()
    root = Path(image_dir).resolve()
    _check_arguments(image_dir, model_dir, shards, batch_size, fit_samples, codes, code_bits)
    if ray is not None:  # first: Ray's processes start while this one loads torch and the model
        from shards.cluster import connect

        connect(ray)
    from engine.encode import Encoder
    from shards import catalog_exists, open_or_create
    from training.model import load_model, pick_device

    catalog_dir = Path(catalog_dir)
    record = read_record(catalog_dir) if catalog_exists(catalog_dir) else None
    # With Ray the actors take the model to their own devices (eager: a runtime's session stays in its process),
    # and this process only commits.
    target = pick_device("cpu" if ray is not None else device)
    path = _inference_path(catalog_dir, record, inference_path, target.type, ray is not None)
    listed, products, unmatched, photos = _images(image_dir, root, metadata, catalog_dir, fetch, progress)
    files, stats, bad_entries = _regular_files(listed)
    model = load_model(model_dir, device=target)
    encoder = _encoder(Encoder(model).using(path), catalog_dir, record, codes, code_bits, files, root, fit_samples,
                       batch_size, workers, progress)
    summary = BuildSummary(inference_path=encoder.inference.name, found=len(listed) + len(photos.failures),
                           failures=bad_entries + photos.failures,
                           metadata_unmatched=unmatched, fetched=photos.counts() if photos.urls else None)
    with open_or_create(catalog_dir, encoder.bits, encoder.feature_dim, shards, index,
                        model_fingerprint=encoder.fingerprint) as catalog:
        _record_encoder(catalog_dir, record, encoder, model_dir, [root] + [photos.folder] * bool(photos.urls))
        ids = np.array([item_id(f) for f in files], dtype=np.int64)
        todo = _todo(catalog, ids, files, stats, products, summary)
        if prune:
            summary.pruned = _prune(catalog, root, set(ids.tolist()), photos.folder if metadata is not None else None)
        new_codes, new_labels = _index(catalog, encoder, ids, files, stats, products, todo, root, batch_size,
                                       workers, ray, progress, summary)
    add_url_sources(summary.failures, products)
    summary.failed = len(summary.failures)
    if new_codes:
        summary.codes = asdict(code_spread(np.concatenate(new_codes), encoder.bits, new_labels))
    summary.seconds = round(time.perf_counter() - started, 2)
    (catalog_dir / REPORT_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _images(image_dir: str | os.PathLike, root: Path, metadata: str | os.PathLike | None, catalog_dir: Path,
            fetch: FetchPolicy, progress: bool) -> tuple[list[Path], dict[Path, dict], list[dict], FetchReport]:
    """The image files to index (those under the image folder, then the photos of the metadata's `image_url`
    rows, fetched now or kept from an earlier run), the product metadata by file, the unusable metadata lines,
    and what fetching did."""
    folder = fetched_folder(catalog_dir)
    products, unmatched = read_metadata_file(metadata, root, folder) if metadata is not None else ({}, [])
    urls = {file: row["image_url"] for file, row in products.items() if file.parent == folder}
    listed = list_images(root)
    if not listed and not urls:
        raise InputError(f"no images (jpg, png, webp, bmp, tiff, gif) under {image_dir}"
                         + (" and no image_url rows in the metadata" if metadata is not None else ""))
    photos = fetch_photos(folder, urls, fetch, progress)
    return listed + photos.files, products, unmatched, photos


def _check_arguments(image_dir: str | os.PathLike, model_dir: str | os.PathLike, shards: int, batch_size: int,
                     fit_samples: int, codes: str | None, code_bits: int | None) -> None:
    """Refuse bad arguments before anything loads or is written."""
    if not Path(image_dir).is_dir():
        raise InputError(f"image directory {image_dir} does not exist or is not a directory")
    for name, value in (("shards", shards), ("batch size", batch_size), ("fit samples", fit_samples)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if codes is not None and codes not in CODES:
        raise InputError(f"codes must be one of {', '.join(CODES)}, not '{codes}'")
    if code_bits is not None and not 1 <= code_bits <= MAX_BITS:
        raise InputError(f"code bits must be in [1, {MAX_BITS}], got {code_bits}")
    if not (Path(model_dir) / "config.json").is_file():
        raise InputError(f"{model_dir} is not a latenthash model directory (no config.json)")


def _encoder(base: Encoder, catalog_dir: Path, record: EngineRecord | None, codes: str | None,
             code_bits: int | None, files: list[Path], root: Path, fit_samples: int, batch_size: int,
             workers: int | None, progress: bool) -> Encoder:
    """`base` (the model on the catalog's inference path) with the catalog's code maker: the one it keeps, or for
    a new catalog one fitted now on features from that path (`codes` other than latent)."""
    from engine.encode import recorded_code_maker

    if record is not None:
        if codes not in (None, record.codes):
            raise InputError(f"catalog {catalog_dir} holds {record.codes} codes; it cannot take {codes} codes "
                             "(build a new catalog for other codes)")
        return replace(base, code_maker=recorded_code_maker(catalog_dir, record))
    if codes in (None, "latent"):
        return base
    return fit_catalog_code_maker(base, codes, code_bits or base.model.config.bits, files, root, fit_samples,
                                  batch_size, workers, progress)


def fit_catalog_code_maker(base: Encoder, method: str, bits: int, files: list[Path], root: Path, samples: int,
                           batch_size: int, workers: int | None, progress: bool) -> Encoder:
    """`base` with `method` fitted on its features of up to `samples` images (a seeded random subset; labels from
    the subfolders for the supervised makers): the features the catalog's codes will be made from."""
    import torch
    from tqdm import tqdm

    from engine.encode import encode_files

    picked = sorted(np.random.default_rng(0).permutation(len(files))[:samples].tolist())
    sample = [files[p] for p in picked]
    labels = [label_of(f, root) for f in sample]
    if method in SUPERVISED and None in labels:
        raise InputError(f"codes {method} are supervised: put the images in one subfolder per class")
    features, kept = [], []
    bar = tqdm(total=len(sample), desc=f"fitting {method}: encoding", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in encode_files(base, sample, batch_size, workers):
            features.append(batch.features)
            kept += batch.positions
            bar.update(len(batch.positions) + len(batch.failures))
    bar.close()
    classes = {name: i for i, name in enumerate(sorted({labels[p] for p in kept if labels[p] is not None}))}
    label_ids = np.array([classes[labels[p]] for p in kept]) if method in SUPERVISED else None
    return replace(base, code_maker=fit_code_maker(method, np.concatenate(features), bits, label_ids))


def _inference_path(catalog_dir: Path, record: EngineRecord | None, asked: str, device_type: str,
                    on_ray: bool) -> str:
    """The path to encode with, checked before any photo is fetched or encoded: `asked` for a new catalog (`auto`
    is eager on Ray); the recorded one for an existing catalog, whose codes must all come from one path, so
    another path asked for, or the recorded one unable to run here (on `device_type`, or on Ray's actors), is
    refused."""
    check_path_name(asked)
    wanted = asked if record is None else record.inference_path
    if record is not None and asked not in ("auto", wanted):
        raise InputError(f"catalog {catalog_dir} holds codes made by inference path {wanted}; it cannot take "
                         f"codes made by {asked} (index into a new catalog to change paths)")
    if on_ray and wanted not in ("auto", "eager"):
        raise InputError(f"inference path {wanted} runs in this process, not on Ray's actors (they encode eager)")
    if on_ray:
        return "eager"
    reason = PATHS[wanted].unavailable(device_type) if wanted != "auto" else None
    if reason is not None:
        made = f" (catalog {catalog_dir} holds codes made by it)" if record is not None else ""
        raise InputError(f"inference path {wanted} cannot run here{made}: {reason}")
    return wanted


def _record_encoder(catalog_dir: Path, record: EngineRecord | None, encoder: Encoder, model_dir: str | os.PathLike,
                    folders: list[Path]) -> None:
    """Keep the code maker (a new one: fitted for this catalog) and engine.json: which model and code maker made
    the codes, and the image folders whose images items may show, these `folders` added."""
    if encoder.code_maker is not None and record is None:
        save_code_maker(encoder.code_maker, catalog_dir / CODE_MAKER_FILE)
    roots = record.image_roots if record is not None else []
    write_record(catalog_dir, EngineRecord(
        model_dir=str(Path(model_dir).resolve()), model_fingerprint=encoder.model.fingerprint, codes=encoder.codes,
        code_maker=CODE_MAKER_FILE if encoder.code_maker is not None else None,
        image_roots=roots + [str(f) for f in folders if str(f) not in roots], model_config=model_config(encoder.model),
        inference_path=encoder.inference.name))


def _todo(catalog: Catalog, ids: np.ndarray, files: list[Path], stats: list[os.stat_result],
          products: dict[Path, dict], summary: BuildSummary) -> list[int]:
    """Positions of the files to encode: new ones, and changed ones (size, mtime or product metadata), whose
    old items are deleted first; the unchanged are counted."""
    todo, changed = [], []
    known = catalog.metadata(ids) if len(catalog) else [None] * len(ids)
    for position, (stored, status) in enumerate(zip(known, stats)):
        if stored is None:
            todo.append(position)
        elif (stored.get("size"), stored.get("mtime_ns"), stored.get("metadata")) == (
                status.st_size, status.st_mtime_ns, products.get(files[position].resolve())):
            summary.unchanged += 1
        else:
            todo.append(position)
            changed.append(position)
    if changed:
        catalog.delete(ids[changed])
        summary.reindexed = len(changed)
    return todo


def _index(catalog: Catalog, encoder: Encoder, ids: np.ndarray, files: list[Path], stats: list[os.stat_result],
           products: dict[Path, dict], todo: list[int], root: Path, batch_size: int, workers: int | None,
           ray: str | None, progress: bool, summary: BuildSummary) -> tuple[list[np.ndarray], list[str | None]]:
    """Encode the files at `todo` and add them batch by batch (each batch one crash-safe commit), counting
    rates into `summary`; returns a sample of the new codes and their labels (to check that they tell the
    images apart)."""
    import torch
    from tqdm import tqdm

    todo_files = [files[p] for p in todo]
    bar = tqdm(total=len(todo_files), desc="indexing", unit="img", disable=not progress)
    encode_start, first_batch = time.perf_counter(), 0  # first_batch: the files in the first batch back
    new_codes, new_labels = [], []
    with torch.inference_mode():
        for batch in _encoded(encoder, todo_files, batch_size, workers, ray):
            positions = [todo[p] for p in batch.positions]
            labels = [label_of(files[p], root) for p in positions]
            if positions:
                catalog.add(ids[positions], batch.codes, batch.features,
                            [item_record(files[p], label, stats[p], products.get(files[p].resolve()))
                             for p, label in zip(positions, labels)])
                if len(new_labels) < SPREAD_SAMPLE:
                    new_codes.append(batch.codes)
                    new_labels += labels
            if not first_batch:
                summary.first_batch_seconds = time.perf_counter() - encode_start
                first_batch = len(batch.positions) + len(batch.failures)
            summary.indexed += len(positions)
            summary.failures += [dict(path=display_path(todo_files[p]), error=e) for p, e in batch.failures]
            bar.update(len(batch.positions) + len(batch.failures))
            rate = (summary.indexed + len(summary.failures)) / (time.perf_counter() - encode_start)
            bar.set_postfix(img_s=f"{rate:.0f}", failed=len(summary.failures))
    bar.close()
    if todo_files:
        _rates(summary, len(todo_files), time.perf_counter() - encode_start, first_batch)
    return new_codes, new_labels


def _rates(summary: BuildSummary, files: int, encoding: float, first_batch: int) -> None:
    """Images per second overall (start-up included) and after the first batch (the pipeline's steady rate)."""
    summary.images_per_second = round(files / encoding, 1)
    if encoding > summary.first_batch_seconds and files > first_batch:
        summary.steady_images_per_second = round((files - first_batch) / (encoding - summary.first_batch_seconds), 1)
    summary.first_batch_seconds = round(summary.first_batch_seconds, 2)


def _encoded(encoder: Encoder, files: list[Path], batch_size: int, workers: int | None,
             ray: str | None) -> Iterator[EncodedBatch]:
    if ray is None:
        from engine.encode import encode_files

        return encode_files(encoder, files, batch_size, workers)
    from engine.encode_ray import encode_files_on_ray

    return encode_files_on_ray(encoder, files, ray, batch_size, workers)


def _regular_files(files: list[Path]) -> tuple[list[Path], list[os.stat_result], list[dict]]:
    """The files that are regular files (after symlinks), their stat, and a failure entry for each other one."""
    kept, stats, failures = [], [], []
    for file in files:
        try:
            stats.append(regular_file_status(file))
            kept.append(file)
        except OSError as error:
            failures.append(dict(path=display_path(file), error=f"{type(error).__name__}: {error.strerror or error}"))
    return kept, stats, failures


def _prune(catalog: Catalog, root: Path, present: set[int], fetched: Path | None = None) -> int:
    """Delete items under `root` whose files no longer exist and, given `fetched` (the folder of photos by URL),
    the items of URLs the metadata no longer lists, with their photos."""
    absent = [(item.id, Path(item.meta.get("path", ""))) for item in catalog if item.id not in present and item.meta]
    gone = [(item, path) for item, path in absent
            if path.is_relative_to(root) and not path.exists() or fetched is not None and path.parent == fetched]
    if not gone:
        return 0
    pruned = catalog.delete(np.array([item for item, _ in gone], dtype=np.int64))
    for _, path in gone:
        if path.parent == fetched:
            path.unlink(missing_ok=True)
    return pruned


EXAMPLES = """examples:
  build-index photos/ --model models/shop48 --catalog catalogs/shop
  build-index photos/ --model models/shop48 --catalog catalogs/shop --shards 8 --workers 4 --prune
  build-index photos/ --model models/shop48 --catalog catalogs/shop-itq --codes itq --code-bits 64
  build-index photos/ --model models/shop48 --catalog catalogs/shop --metadata products.jsonl
  build-index empty/ --model models/shop48 --catalog catalogs/shop --metadata urls.jsonl --fetch-connections 16
  build-index /mnt/shared/photos --model models/shop48 --catalog catalogs/shop --ray auto
  build-index photos/ --model models/shop48 --catalog catalogs/shop-eager --inference-path eager
  python -m engine.build_index ../shared/data/cifar10-sample-png --model models/cifar48 --catalog /tmp/cat
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.build_index"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="directory of images, searched recursively")
    parser.add_argument("--model", required=True, help="model directory written by training.train")
    parser.add_argument("--catalog", required=True, help="catalog directory (created if missing)")
    parser.add_argument("--shards", type=bounded_int(1), default=4,
                        help="shards of a new catalog (default %(default)s)")
    parser.add_argument("--index", choices=list(INDEX_TYPES), default="flat",
                        help=f"Faiss index of a new catalog (default %(default)s). {describe_index_types()}")
    parser.add_argument("--batch-size", type=bounded_int(1), default=256)
    parser.add_argument("--workers", type=bounded_int(0), default=None,
                        help="worker processes; on a CPU each decodes and encodes whole batches on one thread, "
                        "beside a GPU or an OpenVINO path they decode; 0 = none: one prefetch thread, or on "
                        "OpenVINO from 512 images a thread per core that decodes and encodes a batch (default: 0 "
                        "under 512 images or on OpenVINO, else one per core on a CPU, half the cores beside a "
                        "GPU); with --ray, the actors that decode and encode (default: one per GPU of the "
                        "cluster, else one per CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--prune", action="store_true", help="remove items whose image files are gone")
    parser.add_argument("--codes", choices=CODES, default=None,
                        help="codes of a new catalog: latent = the model's latent layer (default); lsh/itq "
                        "hash the model's features with no labels, itq-cca/ksh with the subfolder labels")
    parser.add_argument("--code-bits", type=bounded_int(1), help="code length for --codes other than latent "
                        "(default: the model's bits)")
    parser.add_argument("--metadata", metavar="ITEMS.jsonl",
                        help="product metadata: one JSON object per line with a \"path\" relative to IMAGE_DIR "
                        "or an \"image_url\" (http or https; fetched into the catalog folder, once) (SKU, title, "
                        "price, ...); kept with each item, returned in results, filterable")
    add_fetch_flags(parser)
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="decode and encode on Ray: local (a private instance on this machine), auto or "
                        "HOST:PORT (a running cluster; the images must be at the same path on every node). "
                        "Needs pip install 'latenthash[ray]'")
    parser.add_argument("--fit-samples", type=bounded_int(1), default=20000,
                        help="images the code maker is fitted on (default %(default)s)")
    parser.add_argument("--inference-path", choices=PATH_CHOICES, default="auto",
                        help="how the backbone runs for a new catalog: auto = the path measured fastest on this "
                        "host and backbone family with the same answers (benchmarks/RESULTS.md), else eager; "
                        "an existing catalog keeps its own (default %(default)s)")
    args = parser.parse_args(argv)

    def body() -> int:
        summary = build_index(args.image_dir, args.model, args.catalog, args.shards, args.index, args.batch_size,
                              args.workers, args.device, args.prune, codes=args.codes, code_bits=args.code_bits,
                              fit_samples=args.fit_samples, metadata=args.metadata, ray=args.ray,
                              fetch=fetch_policy(args),
                              inference_path=args.inference_path)
        spread = CodeSpread(**summary.codes) if summary.codes is not None else None
        distinct = f"; {spread.distinct} distinct codes among {spread.images} new" if spread is not None else ""
        print(f"indexed {summary.indexed}, unchanged {summary.unchanged}, re-indexed {summary.reindexed}, "
              f"pruned {summary.pruned}, failed {summary.failed} of {summary.found} images in "
              f"{summary.seconds:.1f}s ({summary.images_per_second:.0f} img/s, inference path "
              f"{summary.inference_path}){distinct}")
        if summary.fetched is not None:
            print(describe_fetching(summary.fetched), file=sys.stderr)
        if summary.failed:
            print(f"failed files are listed in {Path(args.catalog) / REPORT_FILE}", file=sys.stderr)
        if summary.metadata_unmatched:
            print(f"{len(summary.metadata_unmatched)} --metadata lines matched no image; they are listed in "
                  f"{Path(args.catalog) / REPORT_FILE}", file=sys.stderr)
        if spread is not None and spread.collapsed:
            print(f"warning: the codes cannot tell these images apart ({spread.describe()}): searches will rank "
                  "them alike; retrain the model for more steps, or from trained weights (training.train "
                  "--pretrained or --weights)", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
