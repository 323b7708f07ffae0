"""Errors raised by the storage layer; each names the problem and the file it concerns."""


class CatalogError(Exception):
    """A catalog or shard that cannot be opened or used as asked (bad input, damage, mismatch)."""


class DuplicateIdError(CatalogError):
    """An add named ids that the catalog already holds (or named an id twice)."""


class WriterBusyError(CatalogError):
    """Another process holds the catalog's writer lock."""
