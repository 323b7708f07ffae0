"""Errors raised by the storage layer; each names the problem and the file it concerns.

`CatalogError` is the layer's base. A caller's bad argument is an `InvalidArgumentError`, which is also a
`ValueError`: `except ValueError` catches bad input from every layer. Messages state facts (which value, which
file); command lines and the service word them as flags and statuses at their edge.
"""


class CatalogError(Exception):
    """A catalog or shard that cannot be opened or used as asked (bad input, damage, mismatch)."""


class InvalidArgumentError(CatalogError, ValueError):
    """A caller's argument the catalog refuses (k < 1, a radius past the code length, arrays of the wrong shape,
    a filter that does not parse): the caller's to fix, not the catalog's."""


class DuplicateIdError(InvalidArgumentError):
    """An add named ids that the catalog already holds (or named an id twice)."""


class WriterBusyError(CatalogError):
    """Another process holds the catalog's writer lock."""


class DamagedError(CatalogError):
    """Stored data failed its checks (a checksum, a record's shape, a file cut short): the catalog's fault, not
    the caller's; `engine.verify` names and repairs it."""
