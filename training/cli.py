"""The command line's edge: how a command reports a user's mistake (one line on stderr, a non-zero exit, never a
traceback) and names itself. The libraries raise their layers' errors with facts; only entry points import this."""
import errno
import sys
from typing import Callable

from training.errors import TrainingError

# Errors of the machine, not of the program: a full disk, a quota, a file-size limit, a failing device
STORAGE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EFBIG: "a file grew past the size limit", errno.EIO: "an input/output error"}


def program_name(module: str) -> str:
    """The program as the user ran it: `python -m engine.query`, or a console script's own name."""
    import os

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"python -m {module}" if not script or script.endswith(".py") or script == "-c" else script


def run_cli(body: Callable[[], int], user_errors: tuple[type[Exception], ...] = (TrainingError,),
            interrupted: str = "interrupted", describe: Callable[[Exception], str] = str) -> int:
    """Run a command-line body: a user error prints `error: ` and its `describe`d message and exits 2, Ctrl-C
    exits 130; no traceback."""
    try:
        return body()
    except user_errors as error:
        print(f"error: {describe(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise
        print(f"error: {STORAGE_ERRORS[error.errno]}: {error.filename or ''} {error.strerror}".replace("  ", " "),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
