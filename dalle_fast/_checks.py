"""What the kernels serve, and the argument checks the op layer and the Triton host code share.

Each capability fact is stated here once: the op layer (:mod:`dalle_fast.ops`) declares its
backends with them and :mod:`dalle_fast.kernels` / :mod:`dalle_fast.triton_path` check with them.
This module sits below both: it imports only torch and masks (no extension, no triton).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .masks import Layout

__all__ = ["KERNEL_DTYPES", "TRITON_DTYPES", "TRITON_HEAD_DIMS", "CUDA_HEAD_DIMS", "CPU_MAX_HEAD_DIM",
           "MAX_SCALE", "number", "int64", "tensor", "same_device", "check_scale", "check_qkv", "dtype_names"]

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


def number(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` for a bool or anything that is not a real
    number (the ops' wrappers coerce their float arguments with it)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise ValueError(f"{name} must be a number, got {type(value).__name__}") from None
    except OverflowError:
        raise ValueError(f"{name} must be a number within float range, got {value!r}") from None


def int64(name: str, value) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an int (not a bool) in int64's
    range, what the ops' integer arguments hold."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must be within int64, got {value}")
    return value


def tensor(name: str, value, optional: bool = False):
    """``value`` unchanged if it is a tensor (or None when ``optional``); else ValueError naming
    ``name``. The ops' wrappers use it before handing arguments to a backend."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return value
    raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def same_device(first: str, tensors) -> None:
    """ValueError naming the argument unless every tensor of ``tensors`` (pairs ``(name, tensor or
    None)``) is on the device of the first, named ``first``: the device picks the backend, and the
    dispatcher would route a call with one meta or CUDA tensor among CPU ones to another kernel."""
    ref = tensors[0][1]
    for name, t in tensors[1:]:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on {first}'s device {ref.device}, got {t.device}")


def check_scale(scale: float) -> float:
    """``scale`` as a float; ValueError unless positive and finite in float32, the precision the
    kernels use (their running max relies on scale > 0; a non-finite scale gives NaN rows): in
    ``(0, MAX_SCALE]`` and not 0 once rounded to float32. The reference and Triton backends check
    with it; the C++ ops check the same (csrc/layout_checks.h)."""
    scale = number("scale", scale)
    if not 0 < scale <= MAX_SCALE or float(torch.tensor(scale, dtype=torch.float32)) == 0:
        raise ValueError(f"scale must be positive and finite in float32 (the kernels' precision), i.e. in "
                         f"(1.5e-45, {MAX_SCALE:g}], got {scale}")
    return scale


def check_qkv(q, k, v, layout) -> None:
    """ValueError naming the argument unless q, k, v ``(B, H, N, D)`` and ``layout`` make a
    sparse-attention call (any backend; each checks its own dtypes and head dims). Shared by
    :func:`dalle_fast.sparse_attention` and the Triton host code."""
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a dalle_fast.Layout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    n = q.shape[2]
    if n < 1 or n > layout.seq_len:
        raise ValueError(
            f"q has seq={n}, but the layout holds text_len + image_size**2 = {layout.seq_len} positions"
        )
    if q.shape[3] < 1:
        raise ValueError("q must have head_dim >= 1")
