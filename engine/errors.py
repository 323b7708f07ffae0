"""The engine layer's errors, and which errors of every layer are a user's to fix (shown as one line)."""
from __future__ import annotations

from shards.errors import CatalogError
from training.errors import TrainingError


class EngineError(Exception):
    """Base of the engine layer's errors: a query, build or import that cannot go on as asked."""


class InputError(EngineError, ValueError):
    """Bad input to the engine (a query image that is not there, metadata that is not JSON), in one line.
    A ValueError, so that `except ValueError` catches every layer's bad input."""


class BadCropBox(InputError):
    """A crop box that reaches outside its image (the service answers 422, like any other bad parameter)."""


# What the command lines print as `error: ...` and the service answers as a client or catalog problem
USER_ERRORS: tuple[type[Exception], ...] = (EngineError, TrainingError, CatalogError)
