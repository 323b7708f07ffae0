"""The training layer's errors. Entry points (training/cli.py) print them as one line without a traceback.

A message names the run's settings by their argument names (TrainConfig's fields) for a Python caller; the
command line (training.train) shows the same message with its flags instead, so a `Setting` part marks where.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class TrainingError(Exception):
    """Base of the training layer's errors: a run that cannot go on as asked."""


@dataclass(frozen=True)
class Setting:
    """A setting named in a message: `name` is its argument name (a TrainConfig field)."""

    name: str


class UserError(TrainingError, ValueError):
    """Bad input to the training layer (a data path, a backbone name, a setting out of range), in one line.
    A ValueError, so that `except ValueError` catches every layer's bad input."""

    def __init__(self, *parts: str | Setting):
        self.parts = parts
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with each setting called `name_of(its argument name)`: a command line passes its flag."""
        return "".join(part if isinstance(part, str) else name_of(part.name) for part in self.parts)
