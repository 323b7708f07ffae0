"""The one exception type the training layer raises for a user's mistake (bad data path, unknown backbone...).

Command-line entry points catch it and print its message without a traceback.
"""
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


def run_cli(body: Callable[[], int], user_errors: tuple[type[Exception], ...] = (UserError,),
            interrupted: str = "interrupted") -> int:
    """Run a command-line body: a user error prints `error: ...` and exits 2, Ctrl-C exits 130; no traceback."""
    try:
        return body()
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
