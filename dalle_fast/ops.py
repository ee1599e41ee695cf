"""Public functional API of dalle_fast: backend dispatch, autograd, torch.library registration.

Backends:
    ``reference``  pure PyTorch, dense (dalle_fast.reference); any device and float dtype.
    ``cpu``        C++ kernels of the extension ``dalle_fast._C`` (CPU tensors).
    ``triton``     Triton kernels (CUDA tensors; on CPU under ``TRITON_INTERPRET=1``).
    ``cuda``       CUDA C++ kernels of ``dalle_fast._C``.

The default follows the tensors' device (CPU -> ``cpu``, CUDA -> ``triton``); ``backend=`` or the
environment variable ``DALLE_FAST_BACKEND`` forces one. A backend that cannot serve a call raises a
``ValueError`` that says why; nothing falls back silently.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional

import torch

from . import reference
from .masks import Layout

__all__ = ["sparse_attention", "decode_attention", "sample", "BACKENDS", "resolve_backend", "computed_pairs"]

BACKENDS = ("reference", "cpu", "triton", "cuda")
CPU_MAX_HEAD_DIM = 256
#: (query, key) tile sizes each block-sparse backend computes with (cpu: read from the extension
#: below); the triton backend sets its entry when it loads.
TILE_SIZES: Dict[str, tuple] = {}


def _load_extension():
    try:
        from . import _C  # registers the ops with the dispatcher
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "dalle_fast._C is not built: install dalle_fast with `pip install --no-build-isolation .` "
            f"(or `python setup.py build_ext --inplace` for development). Original error: {e}"
        ) from e
    TILE_SIZES["cpu"] = (_C.CPU_TILE_M, _C.CPU_TILE_N)


_load_extension()


# ---------------------------------------------------------------------------------------------
# op registration: fake kernels (torch.compile / meta) and autograd for the C++ ops
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("dalle_fast::sparse_attention_fwd")
def _sparse_attention_fwd_fake(q, k, v, kind, text_len, image_size, kernel_size, dilation, scale):
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.register_fake("dalle_fast::sparse_attention_bwd")
def _sparse_attention_bwd_fake(grad_out, q, k, v, out, lse, grad_lse, kind, text_len, image_size, kernel_size,
                               dilation, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_attention_autograd(fwd_op: str, bwd_op) -> None:
    """Autograd of a sparse-attention forward op ``(q, k, v, *layout ints, scale) -> (out, lse)``
    through its backward op ``(grad_out, q, k, v, out, lse, grad_lse, *layout ints, scale)``; the
    lse output is differentiable too. Shared by the C++ and the Triton ops."""

    def setup_context(ctx, inputs, output):
        q, k, v, *params = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = params

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, grad_lse, *ctx.params)
        return (dq, dk, dv) + (None,) * len(ctx.params)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)

    # the backward op has no derivative: without an autograd kernel PyTorch would let a double
    # backward through it return zeros (with a deprecation warning), so it raises instead
    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"{fwd_op}: double backward (differentiating its gradients) is not supported")

    torch.library.register_autograd(bwd_op._qualified_op_name, no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


register_attention_autograd("dalle_fast::sparse_attention_fwd", torch.ops.dalle_fast.sparse_attention_bwd)


# ---------------------------------------------------------------------------------------------
# argument checking and backend selection
# ---------------------------------------------------------------------------------------------
def resolve_backend(backend: Optional[str], device: torch.device, *, op: str = "sparse_attention",
                    served=BACKENDS, cuda_default: str = "triton") -> str:
    """The backend a call of ``op`` uses: ``backend`` if given; else ``$DALLE_FAST_BACKEND`` when it
    names a backend that serves ``op`` (so choosing ``triton`` globally leaves the decoding ops on
    their CUDA kernels); else ``cpu`` for CPU tensors and ``cuda_default`` for CUDA tensors."""
    if backend is None:
        env = os.environ.get("DALLE_FAST_BACKEND") or None
        if env is not None and env not in BACKENDS:
            raise ValueError(f"DALLE_FAST_BACKEND must name a backend, one of {BACKENDS}, got {env!r}")
        backend = env if env in served else None
    if backend is None:
        return "cpu" if device.type == "cpu" else cuda_default
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in served:
        raise ValueError(f"backend {backend!r} has no {op} kernel; the backends serving it are {served}")
    return backend


#: Largest softmax scale: the kernels compute in float32 and fold log2(e) into the scale, which
#: must stay finite there (a float64 scale past it, e.g. 1e39, made every output NaN).
MAX_SCALE = 2.0e38


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


def _check_attention_args(q, k, v, layout):
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


def _cpu_sparse_attention(q, k, v, layout, scale):
    if q.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {q.device}; use backend='triton' for CUDA")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"backend 'cpu' supports float32, bfloat16 and float16, got {q.dtype}; "
            "use backend='reference' for float64"
        )
    if q.shape[3] > CPU_MAX_HEAD_DIM:
        raise ValueError(f"backend 'cpu' supports head_dim up to {CPU_MAX_HEAD_DIM}, got {q.shape[3]}")
    out, _ = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), scale)
    return out


def _reference_sparse_attention(q, k, v, layout, scale):
    return reference.sparse_attention(q, k, v, layout, scale)


def _unavailable(name: str, why: str) -> Callable:
    def fn(q, k, v, layout, scale):
        raise ValueError(f"backend {name!r} cannot serve sparse_attention: {why}")

    return fn


#: backend name -> implementation(q, k, v, layout, scale) -> out. Optional backends replace their
#: entry when their module imports (dalle_fast.kernels for triton).
_SPARSE_ATTENTION: Dict[str, Callable] = {
    "reference": _reference_sparse_attention,
    "cpu": _cpu_sparse_attention,
    "triton": _unavailable("triton", "the Triton kernels are not available in this build"),
    "cuda": _unavailable("cuda", "sparse attention has no CUDA C++ kernel; use backend='triton'"),
}


def computed_pairs(layout: Layout, seq_len: int, backend: str) -> int:
    """Score entries per (batch, head) that ``backend`` computes for ``layout`` over ``seq_len``
    positions (the in-range part of every non-empty tile; ``seq_len**2`` for dense backends)."""
    tiles = TILE_SIZES.get(backend)
    if tiles is None:
        return seq_len * seq_len
    return layout.tile_table(seq_len, *tiles).computed_pairs()


def sparse_attention(q, k, v, layout: Layout, *, scale: Optional[float] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Block-sparse masked attention (DALL-E masks), differentiable.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``, same shape, dtype and device;
            ``seq <= layout.seq_len``. The cpu backend takes float32/bfloat16/float16 (float32
            compute) and head_dim 1..256; the triton backend float16/bfloat16 (float32
            accumulation) and float32, head_dim 32, 64 or 128, any strides in batch/heads/seq.
        layout: the :class:`dalle_fast.Layout` of this layer.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        backend: ``reference``, ``cpu``, ``triton`` or ``cuda``; default by device (or
            ``$DALLE_FAST_BACKEND``).

    Returns:
        ``(batch, heads, seq, head_dim)`` in q's dtype.
    """
    _check_attention_args(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_scale(scale)
    name = resolve_backend(backend, q.device)
    return _SPARSE_ATTENTION[name](q, k, v, layout, scale)

# ---------------------------------------------------------------------------------------------
# optional backends and the decoding ops
# ---------------------------------------------------------------------------------------------
from . import _triton_ops  # noqa: E402  (registers dalle_fast::triton_sparse_attention_*; no triton import)

_triton_ops._register_autograd()

if _triton_ops.triton_available():
    _SPARSE_ATTENTION["triton"] = _triton_ops.triton_sparse_attention

from .decode import decode_attention  # noqa: E402,F401  (KV-cached decoding)
from .sampling import sample  # noqa: E402,F401
