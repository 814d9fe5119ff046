"""The one exception type for errors a user can cause (jobs print them through mlpscale.cli.job_main)."""

from __future__ import annotations


class MlpscaleError(Exception):
    """A user error: the message names the bad value and the fix; the CLI prints it without a traceback."""
