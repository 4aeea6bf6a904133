"""Numeric precision: the training ``amp`` modes and the benchmark dtypes, and their autocast.

One owner for both: training and evaluation take ``amp`` (``auto``, ``off``, ``bf16``, ``fp16``);
benchmarks and exports take a dtype name (``fp32``, ``bf16``, ``fp16``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .errors import TokenTuneError

AMP_MODES = ("auto", "off", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None = full fp32).

    ``auto``: bf16 on GPUs that support it, else fp16; fp32 on the CPU.
    """
    if amp not in AMP_MODES:
        raise TokenTuneError(f"unknown amp mode {amp!r}; choose from {', '.join(AMP_MODES)}")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def dtype_of(name: str) -> Optional[torch.dtype]:
    """``"fp32"`` -> None (no autocast), ``"bf16"``/``"fp16"`` -> the torch dtype."""
    if name not in DTYPES:
        raise TokenTuneError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: Union[str, torch.device], dtype: Union[None, str, torch.dtype]):
    """``torch.autocast`` for ``dtype`` (a torch dtype or a name of :data:`DTYPES`); a no-op for fp32."""
    if isinstance(dtype, str):
        dtype = dtype_of(dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
