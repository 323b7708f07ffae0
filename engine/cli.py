"""The engine commands' edge: errors of every layer printed as one line (`run_cli`), and argument types that refuse a
bad number in one line before torch or Faiss load, instead of surfacing later as an internal name or a traceback."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from engine.errors import USER_ERRORS, InputError
from training.cli import STORAGE_ERRORS, program_name  # noqa: F401  (the engine's commands name themselves alike)
from training.cli import run_cli as _run_cli


def run_cli(body: Callable[[], int]) -> int:
    """`training.cli.run_cli` for engine commands, whose users' errors come from every layer."""
    return _run_cli(body, USER_ERRORS)


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, a file a command will write that it cannot: a missing or read-only folder."""
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"{flag} {path}: cannot write into {folder}")


def check_input_file(path: str, flag: str) -> None:
    """Refuse, before any work, a file a command will read that it cannot."""
    if not Path(path).is_file() or not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: no readable file there")


def check_catalog_folder(path: str) -> None:
    """Refuse, before torch or Faiss load, a --catalog that is not a folder."""
    if not Path(path).is_dir():
        raise InputError(f"--catalog {path}: no such folder (make one with build-index)")


def _within(value: float, low: float, high: float | None) -> None:
    if value < low or high is not None and value > high:
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        _within(value, low, high)
        return value
    return parse


def bounded_float(low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (nan and inf are refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        _within(value, low, high)
        return value
    return parse
