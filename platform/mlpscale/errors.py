"""The one exception type for errors a user can cause, and the CLI wrapper that prints them."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class MlpscaleError(Exception):
    """A user error: the message names the bad value and the fix; the CLI prints it without a traceback."""


def cli_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a job's main(): user errors print one line on stderr and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except MlpscaleError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapper
