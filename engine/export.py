"""HDF5 export and import of a catalog's items: `python -m engine.export --catalog DIR --out FILE.h5`.

Datasets `ids`, `codes` (packed uint8), `features`, `labels` (-1 where none; names in attribute `label_names`),
`paths` (UTF-8), `metadata` (product metadata as JSON, "" where none), `code_maker` (the code maker's safetensors bytes, for `--codes` other than latent);
attributes `bits`, `model_fingerprint` and `engine` (JSON: codes, code maker, the model's fingerprint and
config), so that an imported copy answers queries exactly as the original, given the model's weights.
`--import FILE.h5` bulk-loads such a file, so codes computed elsewhere (a GPU box, a cluster) can be indexed here.
An import takes data from the file, never trust on this machine: the folders whose images items may show
(`--image-root`) and the model directory (`--model`) come from the importing user, and every count, shape and
value is checked before anything is read in bulk or written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.metadata import parse_product_metadata
from engine.record import (CODE_MAKER_FILE, ENGINE_FILE, EngineRecord, code_maker_file, model_config, parse_record,
                           read_record, write_record)
from shards.codes import MAX_BITS, MAX_FEATURE_DIM, code_bytes
from shards.index import INDEX_TYPES, describe_index_types
from engine.cli import bounded_int, program_name, run_cli
from engine.errors import InputError
from training.files import atomic_write

if TYPE_CHECKING:  # h5py, tqdm and Faiss load when an export or import starts, not for --help
    import h5py
    from tqdm import tqdm

    from shards import Catalog

BATCH = 50_000
DEFAULT_MAX_ITEMS = 10_000_000  # an import's ids are held in memory to check them (8 bytes each, twice)
MAX_CODE_MAKER_BYTES = 256 << 20


def export_catalog(catalog_dir: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> int:
    """Write every item of the catalog to an HDF5 file; returns the item count."""
    import h5py
    from tqdm import tqdm

    from shards import Catalog

    record = read_record(catalog_dir)
    with Catalog.open(catalog_dir, readonly=True) as catalog:
        n, manifest = len(catalog), catalog.manifest
        label_names: dict[str, int] = {}
        with h5py.File(out, "w") as f:
            f.attrs["bits"] = manifest.bits
            f.attrs["model_fingerprint"] = manifest.model_fingerprint or ""
            if record is not None:  # what a query needs besides the model's weights: the copy is self-contained
                carried = EngineRecord(model_fingerprint=record.model_fingerprint, codes=record.codes,
                                       code_maker=record.code_maker, model_config=record.model_config,
                                       inference_path=record.inference_path)
                f.attrs["engine"] = json.dumps(asdict(carried))
                maker = code_maker_file(catalog_dir, record)
                if maker is not None:
                    f.create_dataset("code_maker", data=np.frombuffer(maker.read_bytes(), np.uint8))
            ids = f.create_dataset("ids", (n,), dtype=np.int64)
            codes = f.create_dataset("codes", (n, manifest.layout.code_bytes), dtype=np.uint8)
            features = f.create_dataset("features", (n, manifest.feature_dim), dtype=manifest.feature_dtype)
            labels = f.create_dataset("labels", (n,), dtype=np.int64)
            paths = f.create_dataset("paths", (n,), dtype=h5py.string_dtype("utf-8"))
            products = f.create_dataset("metadata", (n,), dtype=h5py.string_dtype("utf-8"))
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
                products[part] = [json.dumps(m["metadata"]) if m.get("metadata") is not None else "" for m in metas]
            f.attrs["label_names"] = list(label_names)
    return n


@dataclass
class ImportSummary:
    added: int = 0
    unchanged: int = 0  # ids already in the catalog with the same code, features and metadata (a resumed import)
    conflicts: list[int] = field(default_factory=list)  # ids already in the catalog with other content: kept


_DATASETS = ("ids", "codes", "features", "labels", "paths", "metadata")


def _dataset(f: h5py.File, name: str, file: Path) -> h5py.Dataset | None:
    """A dataset stored inside this file: links to other files or objects, external raw storage (bytes of
    another local file) and virtual datasets are refused, so an import copies nothing from elsewhere."""
    import h5py

    link = f.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise InputError(f"{file}: '{name}' is a link to elsewhere; only data stored in the file is imported")
    dataset = f[name]
    if not isinstance(dataset, h5py.Dataset):
        raise InputError(f"{file}: '{name}' is not a dataset")
    if dataset.is_virtual or dataset.id.get_create_plist().get_external_count():
        raise InputError(f"{file}: '{name}' keeps its data outside the file; only data stored in it is imported")
    return dataset


def _check_stored(dataset: h5py.Dataset, name: str, file: Path) -> None:
    """Every row a dataset declares is stored in the file: a few KB can declare 1e9 rows in chunks never
    written (read back as zeros, after gigabytes of memory), which no export makes."""
    import h5py

    if dataset.size == 0:
        return
    if dataset.chunks is None:
        stored = dataset.id.get_storage_size() > 0 or dataset.id.get_create_plist().get_layout() == h5py.h5d.COMPACT
    else:
        expected = int(np.prod([-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks)]))
        stored = dataset.id.get_num_chunks() == expected
    if not stored:
        raise InputError(f"{file}: '{name}' declares {dataset.shape[0]} rows but the file does not store them; "
                         "not a latenthash export")


def _check_room(file: Path, catalog_dir: Path, n: int, bits: int, dim: int) -> None:
    """Refuse an import the disk under the catalog cannot hold, before reading it."""
    folder = next(p for p in (catalog_dir, *catalog_dir.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if _expected_bytes(n, bits, dim) > free:
        raise InputError(f"{file}: {n} items need about {_expected_bytes(n, bits, dim) >> 20} MiB, but only "
                         f"{free >> 20} MiB are free")


def _check_import(f: h5py.File, file: Path, catalog_dir: Path, max_items: int,
                  dtype: str) -> tuple[int, int, int]:
    """Everything an import can check before it writes: datasets, shapes, types, sizes (against each other,
    `max_items` and the free disk, before any dataset is read), ids, features finite as `dtype` (what the
    catalog stores) and product metadata. Returns (items, bits, feature dim)."""
    import h5py

    data = {name: _dataset(f, name, file) for name in _DATASETS}
    missing = [d for d in ("ids", "codes", "features") if data[d] is None]
    if missing or "bits" not in f.attrs:
        raise InputError(f"{file} lacks {', '.join(missing) or 'the bits attribute'}; not a latenthash export")
    try:
        bits = int(f.attrs["bits"])
    except (TypeError, ValueError):
        raise InputError(f"{file}: attribute bits must be an integer, got {f.attrs['bits']!r}") from None
    if not 1 <= bits <= MAX_BITS:
        raise InputError(f"{file}: bits must be in [1, {MAX_BITS}], got {bits}")
    features = data["features"]
    if features.ndim != 2 or not 1 <= features.shape[1] <= MAX_FEATURE_DIM or features.dtype.kind != "f":
        raise InputError(f"{file}: features must be a 2-D float array (items x dims), got {features.dtype} "
                         f"{features.shape}")
    n = features.shape[0]
    if n > max_items:
        raise InputError(f"{file} holds {n} items, more than max_items {max_items}")
    expected = {"ids": ((n,), "iu"), "codes": ((n, code_bytes(bits)), "u"), "labels": ((n,), "iu")}
    for name, (shape, kinds) in expected.items():
        dataset = data[name]
        if dataset is not None and (dataset.shape != shape or dataset.dtype.kind not in kinds):
            raise InputError(f"{file}: {name} must have shape {shape} and an integer type, got {dataset.dtype} "
                             f"{dataset.shape}")
    if data["codes"].dtype.itemsize != 1:
        raise InputError(f"{file}: codes must be packed bytes (uint8)")
    for name in ("paths", "metadata"):
        if data[name] is not None and (data[name].shape != (n,) or h5py.check_string_dtype(data[name].dtype) is None):
            raise InputError(f"{file}: {name} must be {n} strings")
    for name, dataset in data.items():  # what the file is comes before what the disk can hold
        if dataset is not None:
            _check_stored(dataset, name, file)
    _check_room(file, catalog_dir, n, bits, features.shape[1])
    ids = data["ids"][:]
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
        raise InputError(f"{file}: ids must be non-negative 64-bit integers")
    if len(np.unique(ids)) != len(ids):
        raise InputError(f"{file}: ids are not unique")
    for start in range(0, n, BATCH):
        _check_features(features[start:start + BATCH], start, ids, dtype, file)
        if data["metadata"] is not None:
            texts = data["metadata"].asstr("utf-8", "backslashreplace")[start:start + BATCH]
            for row, text in enumerate(texts, start):
                parse_product_metadata(text, f"{file}: metadata of item {int(ids[row])} (row {row})")
    return n, bits, features.shape[1]


def _check_features(part: np.ndarray, start: int, ids: np.ndarray, dtype: str, file: Path) -> None:
    """Features finite as the catalog will store them (1e6 is finite in float32, inf in float16)."""
    with np.errstate(over="ignore"):  # the overflow is what is checked
        bad = ~np.isfinite(part.astype(dtype)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = (f"overflow {dtype} (magnitudes up to {np.finfo(dtype).max:g})" if np.isfinite(part[row]).all()
                else "are not finite (NaN or inf)")
        raise InputError(f"{file}: features of item {int(ids[start + row])} (row {start + row}) {what}")


def _expected_bytes(n: int, bits: int, dim: int) -> int:
    """About what n items take in a catalog: features as float16, code, item record, metadata, index copies."""
    return n * (2 * dim + 3 * code_bytes(bits) + 200)


def _same(item, code: np.ndarray, features: np.ndarray, meta: dict, dtype: str) -> bool:
    stored = item.meta or {}
    return (np.array_equal(item.code, code) and np.array_equal(item.features, features.astype(dtype).astype(np.float32))
            and all(stored.get(k) == meta.get(k) for k in ("path", "label", "metadata")))


def _carried_record(f: h5py.File, file: Path, fingerprint: str | None,
                    model_dir: str | os.PathLike | None) -> tuple[EngineRecord, bytes | None]:
    """The engine record and code maker an export carries, with `model_dir` checked against the fingerprint of
    the codes and recorded, so that queries on the copy need no flags."""
    record = parse_record(f.attrs["engine"], file) if "engine" in f.attrs else EngineRecord(
        model_fingerprint=fingerprint.split("+")[0] if fingerprint else None)
    record.model_dir, record.image_roots = None, []  # places on this machine: the importing user's to name
    maker = _dataset(f, "code_maker", file)
    if record.code_maker is not None and maker is None:
        raise InputError(f"{file}: its codes need the code maker {record.code_maker}, which the file lacks")
    if maker is not None:
        if maker.ndim != 1 or maker.dtype != np.uint8 or maker.shape[0] > MAX_CODE_MAKER_BYTES:
            raise InputError(f"{file}: code_maker must be at most {MAX_CODE_MAKER_BYTES >> 20} MiB of bytes, got "
                             f"{maker.dtype} {maker.shape}")
        _check_stored(maker, "code_maker", file)
    record.code_maker = CODE_MAKER_FILE if maker is not None else None
    if model_dir is not None:
        from training.model import load_model  # torch: only when a model is to be checked

        model = load_model(model_dir)
        if record.model_fingerprint not in (None, model.fingerprint):
            raise InputError(f"model {model_dir} (fingerprint {model.fingerprint}) did not make the codes in "
                             f"{file} ({record.model_description()})")
        record.model_dir, record.model_fingerprint = str(Path(model_dir).resolve()), model.fingerprint
        record.model_config = model_config(model)
    return record, (maker[:].tobytes() if maker is not None else None)


def import_hdf5(file: str | os.PathLike, catalog_dir: str | os.PathLike, shards: int = 4, index: str = "flat",
                progress: bool = True, max_items: int = DEFAULT_MAX_ITEMS,
                model_dir: str | os.PathLike | None = None,
                image_roots: Sequence[str | os.PathLike] = ()) -> ImportSummary:
    """Bulk-load an HDF5 file (the export format) into a catalog, creating it if needed. Resumable: ids already
    in the catalog with the same content are skipped, ids with other content are kept and reported. What a query
    needs besides the model's weights (code maker, fingerprint, the model's config) comes with the file;
    `model_dir`, checked against the codes' fingerprint, is recorded so that queries need no --model.
    `image_roots`: folders whose images the imported items may show (pages, the service); the file's own list
    is ignored, so by default no item shows an image."""
    import h5py
    from tqdm import tqdm

    from shards import Manifest, catalog_exists, open_or_create

    file, catalog_dir = Path(file), Path(catalog_dir)
    if not file.is_file():
        raise InputError(f"no such HDF5 file: {file}")
    roots = _image_roots(image_roots)
    creating, existed = not catalog_exists(catalog_dir), catalog_dir.exists()
    dtype = "float16" if creating else Manifest.read(catalog_dir).feature_dtype
    try:
        f = h5py.File(file, "r")
    except OSError as error:
        raise InputError(f"{file}: not a readable HDF5 file ({error})") from None
    with f:
        n, bits, dim = _check_import(f, file, catalog_dir, max_items, dtype)
        fingerprint = str(f.attrs.get("model_fingerprint", "")) or None
        record, maker = _carried_record(f, file, fingerprint, model_dir)
        names = [str(name) for name in np.atleast_1d(f.attrs.get("label_names", []))]
        catalog = open_or_create(catalog_dir, bits, dim, shards, index, model_fingerprint=fingerprint)
        summary = ImportSummary()
        try:
            with catalog, tqdm(total=n, desc="importing", unit="item", disable=not progress) as bar:
                _store_record(catalog_dir, None if creating else read_record(catalog_dir), record, maker, roots,
                              model_dir is not None)
                _import_batches(f, catalog, names, bar, summary)
        except BaseException:
            if creating and summary.added == 0:  # refused before its first write: leave no catalog behind
                _remove_catalog(catalog_dir, existed)
            raise
    return summary


def _image_roots(folders: Sequence[str | os.PathLike]) -> list[str]:
    """Image folders, resolved (as build-index records its folders); each must exist."""
    roots = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise InputError(f"image root {folder}: not a folder")
        roots.append(str(Path(folder).resolve()))
    return roots


def _store_record(catalog_dir: Path, existing: EngineRecord | None, carried: EngineRecord, maker: bytes | None,
                  roots: list[str], new_model: bool) -> None:
    """Record what the import brings: the file's record for a new catalog (or one without any, or with the
    model given now); the image folders given now are added to those the catalog already trusts."""
    if existing is not None and not new_model:
        carried = existing
    kept = existing.image_roots if existing is not None else []
    carried.image_roots = kept + [root for root in roots if root not in kept]
    if carried is existing and carried.image_roots == kept:
        return
    if carried is not existing and maker is not None:
        atomic_write(catalog_dir / CODE_MAKER_FILE, lambda p: p.write_bytes(maker))
    write_record(catalog_dir, carried)


def _remove_catalog(catalog_dir: Path, keep_folder: bool) -> None:
    """Undo a catalog's creation: the folder, or (one that was there before) what the import put in it."""
    from shards import remove_catalog_files

    if not keep_folder:
        shutil.rmtree(catalog_dir, ignore_errors=True)
        return
    remove_catalog_files(catalog_dir)
    for name in (ENGINE_FILE, CODE_MAKER_FILE):
        (catalog_dir / name).unlink(missing_ok=True)


def _import_batches(f: h5py.File, catalog: Catalog, names: list[str], bar: tqdm, summary: ImportSummary) -> None:
    n = f["features"].shape[0]
    for start in range(0, n, BATCH):
        part = slice(start, min(n, start + BATCH))
        ids, codes, features = f["ids"][part].astype(np.int64), f["codes"][part], f["features"][part]
        labels = f["labels"][part] if "labels" in f else np.full(part.stop - start, -1)
        paths = f["paths"].asstr("utf-8", "backslashreplace")[part] if "paths" in f else [""] * (part.stop - start)
        products = f["metadata"].asstr("utf-8", "backslashreplace")[part] if "metadata" in f \
            else [""] * (part.stop - start)
        metas = [dict(path=p or None, label=(names[l] if 0 <= l < len(names) else int(l)) if l >= 0 else None)
                 for p, l in zip(paths, labels)]
        for row, (meta, product) in enumerate(zip(metas, products)):
            if product:
                meta["metadata"] = parse_product_metadata(product, f"metadata of item {int(ids[row])}")
        present = catalog.present(ids)
        if present.any():  # a resumed import: skip what is there, report what differs
            rows = np.flatnonzero(present)
            for row, item in zip(rows, catalog.get(ids[rows])):
                if _same(item, codes[row], features[row], metas[row], catalog.manifest.feature_dtype):
                    summary.unchanged += 1
                else:
                    summary.conflicts.append(int(ids[row]))
            new = np.flatnonzero(~present)
            ids, codes, features, metas = ids[new], codes[new], features[new], [metas[r] for r in new]
        if len(ids):
            catalog.add(ids, codes, features, metas)
        summary.added += len(ids)
        bar.update(part.stop - start)


EXAMPLES = """examples:
  python -m engine.export --catalog catalogs/shop --out shop.h5
  python -m engine.export --import shop.h5 --catalog catalogs/shop-copy --shards 8 --model models/shop48 \
      --image-root photos/   # items under photos/ show their images
  python -m engine.export --import shop.h5 --catalog catalogs/shop-copy   # a killed import: run it again
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.export"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory to export (or to import into)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="HDF5 file to write")
    action.add_argument("--import", dest="import_file", metavar="FILE", help="HDF5 file to load into --catalog")
    parser.add_argument("--shards", type=bounded_int(1), default=4, help="shards, when --import creates the catalog")
    parser.add_argument("--index", choices=list(INDEX_TYPES), default="flat",
                        help=f"Faiss index of a new catalog (default %(default)s). {describe_index_types()}")
    parser.add_argument("--max-items", type=bounded_int(1), default=DEFAULT_MAX_ITEMS,
                        help="refuse an import of more items than this (default %(default)s; its ids are checked "
                        "in memory, 16 bytes each)")
    parser.add_argument("--model", help="with --import: the model that made the codes; checked against them and "
                        "recorded, so queries need no --model")
    parser.add_argument("--image-root", action="append", default=[], metavar="DIR",
                        help="with --import (repeatable): a folder whose images the imported items may show in "
                        "pages and the service; the file's own list is never trusted, so without it none show")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.out and (args.model or args.image_root):
            raise InputError("--model and --image-root go with --import (what to record in the imported catalog)")
        if args.out:
            n = export_catalog(args.catalog, args.out)
            print(f"exported {n} items to {args.out}")
        else:
            summary = import_hdf5(args.import_file, args.catalog, args.shards, args.index, max_items=args.max_items,
                                  model_dir=args.model, image_roots=args.image_root)
            print(f"imported {summary.added} items into {args.catalog}"
                  + (f" ({summary.unchanged} already there)" if summary.unchanged else ""))
            if summary.conflicts:
                print(f"error: {len(summary.conflicts)} ids are already in the catalog with other content and were "
                      f"kept as they are: {summary.conflicts[:10]}", file=sys.stderr)
                return 1
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
