"""How command-line entry points report a user's mistake: one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

from shards import CatalogError
from training.errors import UserError

USER_ERRORS = (UserError, CatalogError)


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; user errors print `error: ...` and exit 2, Ctrl-C exits 130, never a traceback."""
    try:
        return main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
