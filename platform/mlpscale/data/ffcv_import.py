"""Import FFCV without its four-second numba compile and without changing torch's thread count.

`ffcv.fields.rgb_image` builds IMAGE_MODES, two constants FFCV only ever reads from Python, as a
numba typed Dict, and creating one compiles numba's dict implementation: about 4 of the 4.5 s
an FFCV import takes, paid again by every process that imports it (each Ray Train worker, each
trial). Imported through here, IMAGE_MODES is a plain dict. Importing FFCV also sets torch's
thread count to 1; it is put back. mlpscale's modules that use FFCV import this module first.
"""

from __future__ import annotations

import sys

import numba.typed
import torch


def import_ffcv() -> None:
    """Import FFCV (once per process) with a plain-dict IMAGE_MODES; torch keeps its thread count."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    threads = torch.get_num_threads()
    typed_dict, numba.typed.Dict = numba.typed.Dict, dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
        torch.set_num_threads(threads)


import_ffcv()
