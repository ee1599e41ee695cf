"""What the kernels serve, and the argument checks the op layer and the Triton host code share.

Each capability fact is stated here once: the op layer (:mod:`dalle_fast.ops`) declares its
backends with them and :mod:`dalle_fast.kernels` / :mod:`dalle_fast.triton_path` check with them.
This module sits below both: it imports only torch (no extension, no triton).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["KERNEL_DTYPES", "TRITON_DTYPES", "TRITON_HEAD_DIMS", "CUDA_HEAD_DIMS", "CPU_MAX_HEAD_DIM",
           "MAX_SCALE", "check_scale", "dtype_names"]

#: dtypes of the C++ kernels (cpu and cuda backends: sparse attention, decode, sampling); they
#: compute in float32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes of the Triton kernels: float16/bfloat16 with float32 accumulation, float32 with IEEE dots
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: head dims the Triton kernels are specialised for
TRITON_HEAD_DIMS = (32, 64, 128)
#: head dims the CUDA decode kernel is compiled for (csrc/cuda)
CUDA_HEAD_DIMS = (32, 64, 128)
#: largest head_dim of the CPU sparse-attention kernels (CPU_MAX_HEAD_DIM in csrc/cpu_impl.cpp)
CPU_MAX_HEAD_DIM = 256

#: Largest softmax scale: the kernels compute in float32 and fold log2(e) into the scale, which
#: must stay finite there (a float64 scale past it, e.g. 1e39, made every output NaN).
MAX_SCALE = 2.0e38


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """``"float16, bfloat16 and float32"`` for error messages."""
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_scale(scale: float) -> float:
    """``scale`` as a float; ValueError unless positive and finite in float32, the precision the
    kernels use (their running max relies on scale > 0; a non-finite scale gives NaN rows): in
    ``(0, MAX_SCALE]`` and not 0 once rounded to float32. Shared by every attention op."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number, got {type(scale).__name__}") from None
    if not 0 < scale <= MAX_SCALE or float(torch.tensor(scale, dtype=torch.float32)) == 0:
        raise ValueError(f"scale must be positive and finite in float32 (the kernels' precision), i.e. in "
                         f"(1.5e-45, {MAX_SCALE:g}], got {scale}")
    return scale
