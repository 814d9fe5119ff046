"""The preamble of every job in jobs/: logging set-up, and user errors as one line on stderr with exit status 2.

    @job_main()                       # INFO logs with timestamps (long jobs)
    def main(argv=None) -> int: ...

This is the one place in the package that writes to a terminal itself: the job's own output is
printed by the job; the package logs.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from mlpscale.errors import MlpscaleError

TIMED_LOGS = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_LOGS = "%(levelname)s %(name)s: %(message)s"
MESSAGE_LOGS = "%(message)s"

Main = Callable[..., int | None]


def job_main(log_format: str | None = TIMED_LOGS) -> Callable[[Main], Callable[..., int]]:
    """Wrap a job's main(): INFO logging in `log_format` (None: no logging set-up), then run it; an
    MlpscaleError prints `error: <message>` on stderr and returns 2; otherwise main's status (None is 0)."""

    def decorate(main: Main) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(*args, **kwargs) -> int:
            if log_format is not None:
                logging.basicConfig(level=logging.INFO, format=log_format)
            try:
                return int(main(*args, **kwargs) or 0)
            except MlpscaleError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2

        return wrapper

    return decorate
