"""Errors raised by the storage layer; each names the problem and the file it concerns."""


class CatalogError(Exception):
    """A catalog or shard that cannot be opened or used as asked (bad input, damage, mismatch)."""


class DuplicateIdError(CatalogError):
    """An add named ids that the catalog already holds (or named an id twice)."""


class WriterBusyError(CatalogError):
    """Another process holds the catalog's writer lock."""


class DamagedError(CatalogError):
    """Stored data failed its checks (a checksum, a record's shape, a file cut short): the catalog's fault, not
    the caller's; `engine.verify` names and repairs it."""
