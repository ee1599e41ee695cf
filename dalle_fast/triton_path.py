"""Which Triton attention kernels a call runs: ``hopper`` or ``portable``.

``hopper`` (:mod:`dalle_fast.kernels.hopper`): 128-row query tiles walked over key-tile segments,
TMA loads and warp specialisation, a persistent grid, and a one-launch backward. It serves float16
and bfloat16 on compute capability 9.x GPUs (H100, H200) with a Triton that has TMA tensor
descriptors, for layouts whose tile tables fit the segment walk (every kind except ``conv_like``
with dilation > 1 at some sizes). ``portable`` (:mod:`dalle_fast.kernels.sparse_attention`):
table-driven kernels that run on every GPU Triton supports and under the interpreter.

``auto`` (default) picks ``hopper`` where it can serve the call, else ``portable``. The
environment variable ``DALLE_FAST_TRITON_PATH`` or :func:`set_triton_path` forces one; forcing
``hopper`` where it cannot serve raises a ``ValueError`` saying why (under ``TRITON_INTERPRET=1``
on CPU tensors both paths run, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Optional

import torch

from ._checks import TRITON_DTYPES, TRITON_HEAD_DIMS, dtype_names
from .masks import Layout

__all__ = ["PATHS", "triton_path", "set_triton_path", "use_triton_path", "hopper_unavailable"]

PATHS = ("auto", "hopper", "portable")
_ENV = "DALLE_FAST_TRITON_PATH"
_forced: Optional[str] = None


def _check_name(name, what: str) -> str:
    if name not in PATHS:
        raise ValueError(f"{what} must be one of {PATHS}, got {name!r}")
    return name


def _requested() -> str:
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(_ENV, "auto").strip().lower() or "auto", _ENV)


def set_triton_path(name: str) -> None:
    """Force the Triton path for later calls (``auto``, ``hopper`` or ``portable``); overrides
    ``DALLE_FAST_TRITON_PATH``."""
    global _forced
    _forced = _check_name(name, "name")


@contextlib.contextmanager
def use_triton_path(name: str):
    """Context manager: :func:`set_triton_path` inside the block, the previous choice after it."""
    global _forced
    previous = _forced
    set_triton_path(name)
    try:
        yield
    finally:
        _forced = previous


@functools.lru_cache(maxsize=None)
def _has_tma() -> bool:
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def hopper_unavailable(device, dtype: torch.dtype, layout: Optional[Layout] = None,
                       seq_len: Optional[int] = None, head_dim: int = 64) -> Optional[str]:
    """Why the ``hopper`` kernels cannot serve a call with these properties, or None if they can."""
    device = torch.device(device)
    if dtype not in TRITON_DTYPES:
        return f"the hopper kernels serve {dtype_names(TRITON_DTYPES)}, got {dtype}"
    if head_dim not in TRITON_HEAD_DIMS:
        return f"the hopper kernels serve head_dim {', '.join(map(str, TRITON_HEAD_DIMS[:-1]))} and " \
               f"{TRITON_HEAD_DIMS[-1]}, got {head_dim}"
    if not _has_tma():
        return "this Triton has no TMA tensor descriptors (triton.tools.tensor_descriptor)"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] != 9:
            return f"the hopper kernels need compute capability 9.x, {torch.cuda.get_device_name(device)} has " \
                   f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    elif not _interpreting(device):
        return f"the hopper kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
    if layout is not None:
        from .kernels import hopper_plan

        n = layout.seq_len if seq_len is None else seq_len
        if not hopper_plan.fits(layout, n, head_dim, _interpreting(device)):
            return f"{layout} at seq_len {n} does not fit the segment walk (more than three runs of tiles)"
    return None


@functools.lru_cache(maxsize=1024)
def _unavailable_cached(device, dtype, layout, seq_len, head_dim, interpreting):
    """:func:`hopper_unavailable`, once per call signature (a dict lookup per call after the first)."""
    return hopper_unavailable(device, dtype, layout, seq_len, head_dim)


def choose(device, dtype: torch.dtype, layout: Optional[Layout], seq_len: Optional[int], head_dim: int) -> str:
    """The path a call takes (``hopper`` or ``portable``); ValueError when ``hopper`` is forced but
    cannot serve it."""
    requested = _requested()
    if requested == "portable":
        return "portable"
    device = torch.device(device)
    interpreting = _interpreting(device)
    if requested == "auto" and (interpreting or dtype == torch.float32):
        # the interpreter's default: the kernels that run everywhere; float32 (IEEE products, no
        # tensor cores) gains nothing from the hopper kernels' structure
        return "portable"
    why = _unavailable_cached(device, dtype, layout, seq_len, head_dim, interpreting)
    if why is None:
        return "hopper"
    if requested == "hopper":
        raise ValueError(f"Triton path 'hopper' was requested ({_ENV} or set_triton_path) but cannot serve "
                         f"this call: {why}")
    return "portable"


def triton_path(q_or_device=None, layout: Optional[Layout] = None) -> str:
    """The Triton path (``hopper`` or ``portable``) a ``sparse_attention`` call takes: for tensor
    ``q`` ``(B, H, N, D)`` and ``layout`` exactly; for a device (default: the current CUDA device)
    the path of a bfloat16, head_dim 64 call with a layout that fits."""
    if isinstance(q_or_device, torch.Tensor):
        q = q_or_device
        return choose(q.device, q.dtype, layout, q.shape[-2] if layout is not None else None, q.shape[-1])
    device = q_or_device
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return choose(device, torch.bfloat16, layout, None, 64)
