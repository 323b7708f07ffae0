"""Storage and search: sharded Faiss binary indices with features, kept in LMDB."""
from shards.catalog import Catalog, Hits, Item, Manifest
from shards.codes import hamming_distances, pad_codes
from shards.errors import CatalogError, DuplicateIdError

__all__ = ["Catalog", "CatalogError", "DuplicateIdError", "Hits", "Item", "Manifest", "hamming_distances",
           "pad_codes"]
