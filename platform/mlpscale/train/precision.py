"""Numeric precision: bf16 autocast on GPUs and on CPUs with native bf16 (avx512_bf16 / AMX), TF32 on GPUs."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': `auto` picks bf16 where it is native: CUDA GPUs from Ampere on (not the emulated
    bf16 of a V100 or T4) and CPUs with avx512_bf16 or AMX."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
