"""What a catalog records about how its items were made: engine.json (the model, the code maker, the image
folders it indexed) and each item's id and metadata. Read by build-index, queries and export alike.

Everything here is read from files a user (or an attacker) can edit, so each field is checked, and a catalog's
own files are only looked up inside the catalog folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from engine.fetch import cache_file, check_url
from engine.inference import PATHS
from engine.metadata import parse_product_metadata
from shards.errors import CatalogError
from engine.errors import InputError
from training.files import atomic_write
from training.hashers import CODE_MAKERS

if TYPE_CHECKING:  # torch: loaded by whoever has a model, not by this module
    from training.model import HashingNet

ENGINE_FILE = "engine.json"
CODE_MAKER_FILE = "code-maker.safetensors"
CODES = ("latent", *CODE_MAKERS)


@dataclass
class EngineRecord:
    model_dir: str | None = None
    model_fingerprint: str | None = None
    codes: str = "latent"
    code_maker: str | None = None  # a file name inside the catalog folder
    image_roots: list[str] = field(default_factory=list)  # folders whose images items may show
    model_config: dict | None = None  # the model's config.json: which model a query needs, where it is not here
    inference_path: str = "eager"  # how the backbone ran (engine/inference.py): one path for all of a catalog's codes

    def check(self, where: Path) -> None:
        for name in ("model_dir", "model_fingerprint", "code_maker"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise CatalogError(f"{where}: {name} must be a string or null")
        if self.codes not in CODES:
            raise CatalogError(f"{where}: codes must be one of {', '.join(CODES)}, not {self.codes!r}")
        if self.code_maker is not None and (Path(self.code_maker).name != self.code_maker
                                            or self.code_maker in ("", ".", "..")):
            raise CatalogError(f"{where}: code_maker must be a file name inside the catalog folder, "
                               f"not {self.code_maker!r}")
        if not isinstance(self.image_roots, list) or not all(isinstance(r, str) for r in self.image_roots):
            raise CatalogError(f"{where}: image_roots must be a list of folder paths")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise CatalogError(f"{where}: model_config must be an object")
        if self.inference_path not in PATHS:
            raise CatalogError(f"{where}: inference_path must be one of {', '.join(PATHS)}, "
                               f"not {self.inference_path!r}")

    def model_description(self) -> str:
        """Which model made the codes, in words, for an error that asks the user for it."""
        config = self.model_config or {}
        what = ", ".join(f"{k} {config[k]}" for k in ("backbone", "bits") if k in config)
        return f"model {self.model_fingerprint}" + (f" ({what})" if what else "")


def read_record(catalog_dir: str | os.PathLike) -> EngineRecord | None:
    """engine.json of a catalog, checked (None if the catalog has none)."""
    path = Path(catalog_dir) / ENGINE_FILE
    if not path.is_file():
        return None
    try:
        return parse_record(path.read_bytes(), path)
    except OSError as error:
        raise CatalogError(f"{path}: damaged ({error})") from None


def parse_record(raw: bytes | str, where: Path) -> EngineRecord:
    """An engine record from its JSON text, every field checked."""
    path = where
    try:
        stored = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(stored) - {f.name for f in fields(EngineRecord)})
        if unknown:
            raise ValueError(f"unknown fields {', '.join(unknown)}")
        record = EngineRecord(**stored)
    except (UnicodeDecodeError, ValueError, TypeError) as error:
        raise CatalogError(f"{path}: damaged ({error})") from None
    record.check(path)
    return record


def write_record(catalog_dir: str | os.PathLike, record: EngineRecord) -> None:
    """engine.json replaced whole and durably (as the catalog's manifest is): a crash leaves the old or the new."""
    path = Path(catalog_dir) / ENGINE_FILE
    record.check(path)
    text = json.dumps(asdict(record), indent=2) + "\n"
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as error:
        raise CatalogError(f"{path}: could not be written ({error.strerror or error})") from error


def model_config(model: HashingNet) -> dict:
    """A loaded model's config.json as a record keeps it (what a query needs to know of the model that is not
    here), from the model itself: its config was read once, by `load_model`."""
    return {**asdict(model.config), "fingerprint": model.fingerprint}


def code_maker_file(catalog_dir: str | os.PathLike, record: EngineRecord) -> Path | None:
    """The catalog's code maker file, which must be a regular file inside the catalog folder."""
    if record.code_maker is None:
        return None
    folder = Path(catalog_dir).resolve()
    path = (folder / record.code_maker).resolve()
    if path.parent != folder or not path.is_file():
        raise CatalogError(f"{Path(catalog_dir) / ENGINE_FILE}: its code maker {record.code_maker!r} is not a "
                           "file in the catalog folder")
    return path


def item_id(path: str | os.PathLike) -> int:
    """A stable 63-bit id from the absolute path's bytes (any file name, UTF-8 or not)."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(path), digest_size=8).digest(), "big") >> 1


def display_path(path: str | os.PathLike) -> str:
    """A path as text that can always be stored and printed: bytes that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def label_of(path: Path, root: Path) -> str | None:
    """The first subfolder under the root is the label (class) when the layout has one."""
    if not path.is_relative_to(root):  # a photo fetched by URL, kept in the catalog folder
        return None
    parts = path.relative_to(root).parts
    return display_path(parts[0]) if len(parts) > 1 else None


def item_record(file: Path, label: str | None, status: os.stat_result, product: dict | None) -> dict:
    """What an item records about its image: path, label, size and mtime (to notice changes), and the product's
    metadata (stored under the key `metadata`)."""
    record = dict(path=display_path(file), label=label, size=status.st_size, mtime_ns=status.st_mtime_ns)
    if product is not None:
        record["metadata"] = product
    return record


def regular_file_status(path: str | os.PathLike) -> os.stat_result:
    """stat() of a path that must be a regular file (after symlinks); OSError says why not (dangling or looping
    link, FIFO, device, folder), so one odd directory entry is reported instead of hanging or sinking a build."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise OSError(f"not a regular file ({stat.filemode(status.st_mode)[0]!r} entry)")
    return status


def read_metadata_file(file: str | os.PathLike, root: Path,
                       fetched: Path | None = None) -> tuple[dict[Path, dict], list[dict]]:
    """Product metadata per image from a JSON-lines file (one object per line with a `path` relative to `root`, or
    with `fetched`, an `image_url` instead): {resolved image path: the object without `path`}, and a report entry
    for each line that cannot be used. A URL's path is its file in the `fetched` folder (engine.fetch.cache_file),
    there or not yet; the object keeps its `image_url`."""
    by_path, problems = {}, []
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read product metadata file {file}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_product_metadata(line, f"{file} line {number}")
            relative = row.pop("path", None) if row is not None else None
            if relative is None and fetched is not None and row is not None and "image_url" in row:
                by_path[_url_file(row["image_url"], fetched)] = row
                continue
            if not isinstance(relative, str) or not relative:
                raise InputError(f"{file} line {number}: no \"path\" string"
                                 + (" or \"image_url\"" if fetched is not None else ""))
        except InputError as error:
            problems.append(dict(line=number, error=str(error)))
            continue
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            problems.append(dict(line=number, path=relative, error="no such image under the image folder"))
            continue
        by_path[path] = row
    return by_path, problems


def _url_file(url: object, fetched: Path) -> Path:
    """The file a metadata row's `image_url` is fetched into; InputError for a URL that is not http(s)."""
    if not isinstance(url, str):
        raise InputError("\"image_url\" must be a string")
    check_url(url)
    return cache_file(fetched, url)


def item_image(path: str | None, roots: list[str]) -> Path | None:
    """An item's image file, if it is a regular file inside one of the catalog's image folders: metadata is data
    anyone can import, and must not make a page or a service read any file on the machine."""
    if not path or not roots:
        return None
    try:
        real = Path(os.path.realpath(path))
        if any(real.is_relative_to(os.path.realpath(root)) for root in roots):
            regular_file_status(real)
            return real
    except (OSError, ValueError):
        pass
    return None
