"""How the engine's command-line entry points report a user's mistake: one line on stderr, a non-zero exit."""
from __future__ import annotations

from typing import Callable

from shards.errors import CatalogError
from training.errors import UserError
from training.errors import run_cli as _run_cli


def run_cli(body: Callable[[], int]) -> int:
    """`training.errors.run_cli` for engine commands, whose user errors also come from the catalog."""
    return _run_cli(body, (UserError, CatalogError))
