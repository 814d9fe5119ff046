"""Keep freed host memory in the process, so per-batch CPU tensors do not page-fault fresh memory each step.

A loader whose device is the CPU hands out a new float32 batch per step (tens of MB at 64 px).
With glibc's defaults each such block goes back to the kernel when freed and the next batch
faults it in again, page by page, zeroed: at 64 px that was half of the decoder's time on the
2-core CI machine (benchmarks/RESULTS.md). `keep_freed_memory()` asks glibc, once per process,
to serve blocks up to 32 MB from its heap, to grow the heap 64 MB at a time and to keep up to
512 MB of freed memory instead of trimming it. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TOP_PAD: 64 << 20, _M_TRIM_THRESHOLD: 512 << 20}
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt once; True when glibc took all of them."""
    global _applied
    if _applied is None:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            _applied = False
        else:
            _applied = all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
        log.debug("glibc keeps freed memory: %s", _applied)
    return _applied
