"""The training layer's errors. Entry points (training/cli.py) print them as one line without a traceback."""


class TrainingError(Exception):
    """Base of the training layer's errors: a run that cannot go on as asked."""


class UserError(TrainingError, ValueError):
    """Bad input to the training layer (a data path, a backbone name, a setting out of range), in one line.
    A ValueError, so that `except ValueError` catches every layer's bad input."""
