"""A catalog's manifest (`manifest.json`): what every shard holds (code length, feature size and type), how
many shards there are and which index serves them. It is a file anyone can edit, so every field is checked on
read; the shards' own layout records are checked against it when they open."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shards.codes import MAX_BITS, MAX_FEATURE_DIM
from shards.errors import CatalogError, InvalidArgumentError
from shards.files import write_atomic
from shards.index import index_type
from shards.records import BLOCK_BYTES, FEATURE_DTYPES, ShardLayout

MANIFEST = "manifest.json"
FORMAT = "latenthash-catalog"
FORMAT_VERSION = 3  # 2: features in slot-addressed blocks; 3: item checksums and shard layout records
MAX_SHARDS = 4096


@dataclass
class Manifest:
    bits: int
    feature_dim: int
    shard_count: int = 4
    feature_dtype: str = "float16"
    index_type: str = "flat"
    hash_bits: int = 16
    model_fingerprint: str | None = None
    block_items: int = 0  # feature rows per LMDB block; 0 = BLOCK_BYTES worth, fixed when the catalog is made
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.block_items and type(self.feature_dim) is int and self.feature_dim > 0 \
                and self.feature_dtype in FEATURE_DTYPES:
            row = self.feature_dim * np.dtype(self.feature_dtype).itemsize
            self.block_items = max(1, BLOCK_BYTES // row)

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.bits, self.feature_dim, self.feature_dtype, self.index_type, self.hash_bits,
                           self.block_items)

    def check(self) -> None:
        """Every field of the right type and within bounds; InvalidArgumentError names the first that is not."""
        def integer(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise InvalidArgumentError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

        integer("bits", 1, MAX_BITS)
        integer("feature_dim", 1, MAX_FEATURE_DIM)
        integer("shard_count", 1, MAX_SHARDS)
        integer("hash_bits", 1, 64)
        integer("block_items", 1, 1 << 24)
        if self.feature_dtype not in FEATURE_DTYPES:
            raise InvalidArgumentError(f"unknown feature dtype {self.feature_dtype!r}; choose one of "
                                       f"{', '.join(FEATURE_DTYPES)}")
        index_type(self.index_type)
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise InvalidArgumentError(f"model_fingerprint must be a string, got {self.model_fingerprint!r}")

    def write(self, folder: Path) -> None:
        write_atomic(folder / MANIFEST, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """The manifest of the catalog in `folder`; CatalogError if there is none or it is damaged or foreign."""
        file = folder / MANIFEST
        if not file.is_file():
            raise CatalogError(f"{file}: missing; {folder} is not a latenthash catalog")
        try:
            fields = json.loads(file.read_bytes().decode("utf-8"))
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            if fields.get("format") != FORMAT:
                raise CatalogError(f"{file}: not a latenthash catalog manifest")
            unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
            if unknown:
                raise TypeError(f"unknown fields {', '.join(map(str, unknown))}")
            manifest = cls(**fields)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise CatalogError(f"{file}: corrupted manifest ({error})") from error
        if type(manifest.format_version) is not int or manifest.format_version > FORMAT_VERSION:
            raise CatalogError(f"{file}: format version {manifest.format_version} is newer than this latenthash "
                               f"reads ({FORMAT_VERSION}); upgrade latenthash")
        if manifest.format_version < FORMAT_VERSION:
            raise CatalogError(f"{file}: format version {manifest.format_version} was written by an older "
                               f"latenthash; rebuild the catalog with build-index")
        try:
            manifest.check()
        except CatalogError as error:
            raise CatalogError(f"{file}: corrupted manifest ({error})") from None
        return manifest
