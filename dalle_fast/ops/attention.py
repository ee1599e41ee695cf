"""Block-sparse attention: argument coercion, backend choice, the C++ op's fake kernel and autograd.

Backends (:mod:`dalle_fast.ops._backend` declares what each serves):
    ``reference``  pure PyTorch, dense (dalle_fast.reference); any device and float dtype.
    ``cpu``        C++ kernels of the extension ``dalle_fast._C`` (CPU tensors).
    ``triton``     Triton kernels (CUDA tensors; on CPU under ``TRITON_INTERPRET=1``), :mod:`._triton`.
    ``cuda``       none: sparse attention has no CUDA C++ kernel.

The default follows the tensors' device (CPU -> ``cpu``, CUDA -> ``triton``); ``backend=`` or the
environment variable ``DALLE_FAST_BACKEND`` forces one. A backend that cannot serve a call raises a
``ValueError`` that says why; nothing falls back silently.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from .._checks import check_qkv, check_scale, number, same_device, tensor
from ..masks import Layout
from . import _triton
from ._backend import TILE_SIZES, register_attention_autograd, select

__all__ = ["sparse_attention", "computed_pairs"]


# ---------------------------------------------------------------------------------------------
# the C++ op: fake kernel (torch.compile / meta) and autograd
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("dalle_fast::sparse_attention_fwd")
def _sparse_attention_fwd_fake(q, k, v, kind, text_len, image_size, kernel_size, dilation, scale):
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.register_fake("dalle_fast::sparse_attention_bwd")
def _sparse_attention_bwd_fake(grad_out, q, k, v, out, lse, grad_lse, kind, text_len, image_size, kernel_size,
                               dilation, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_attention_autograd("dalle_fast::sparse_attention_fwd", torch.ops.dalle_fast.sparse_attention_bwd)


def _cpu(q, k, v, layout, scale):
    out, _ = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), scale)
    return out


def _reference(q, k, v, layout, scale):
    check_qkv(q, k, v, layout)  # the C++ op and the Triton host code check their own arguments
    check_scale(scale)
    return reference.sparse_attention(q, k, v, layout, scale)


#: backend name -> implementation(q, k, v, layout, scale) -> out, for the backends that have one
_IMPLS = {"reference": _reference, "cpu": _cpu, "triton": _triton.triton_sparse_attention}


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
    # coerce and choose a backend; each backend's entry point checks the arguments (C++ op,
    # Triton host code, _reference)
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a dalle_fast.Layout, got {type(layout).__name__}")
    q, k, v = tensor("q", q), tensor("k", k), tensor("v", v)
    same_device("q", (("q", q), ("k", k), ("v", v)))
    head_dim = q.shape[-1] if q.dim() else None
    scale = 1.0 / math.sqrt(max(head_dim or 1, 1)) if scale is None else number("scale", scale)
    name = select("sparse_attention", backend, q.device, q.dtype, head_dim)
    return _IMPLS[name](q, k, v, layout, scale)
