"""The ``triton`` backend of sparse attention: torch.library registration of the Triton kernels
(``dalle_fast.kernels``) and the eager path around them.

The ops ``dalle_fast::triton_sparse_attention_fwd`` / ``_bwd`` are Python custom ops: opaque to
``torch.compile`` (the tile-table lookup and the kernel launch happen inside the op), with fake
kernels for tracing and autograd registered like the C++ ``sparse_attention_fwd``. They are
device-agnostic: on CUDA tensors they launch the GPU kernels, on CPU tensors they run under the
Triton interpreter when ``TRITON_INTERPRET=1``.

Triton itself is imported lazily, on the first call of an op (never by ``import dalle_fast``), so
the interpreter can be switched on before the kernels are defined.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode  # noqa: E501

from .. import triton_path as _path
from .._checks import TRITON_DTYPES as DTYPES
from .._checks import TRITON_HEAD_DIMS as HEAD_DIMS
from .._checks import check_scale
from ..masks import KINDS, Layout
from ._backend import MISSING, OPS, register_attention_autograd

__all__ = ["triton_available", "kernels", "triton_sparse_attention", "HEAD_DIMS", "DTYPES"]

_KERNEL = OPS["sparse_attention"].kernels["triton"]


def check_static(q: Tensor) -> None:
    """ValueError unless the triton backend serves q's dtype and head_dim (traceable)."""
    why = _KERNEL.why_not(q.device, q.dtype, q.shape[-1])
    if why is not None:
        raise ValueError(f"backend 'triton' {why}")


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    return MISSING[_KERNEL.needs] is None


def kernels():
    """The kernel module ``dalle_fast.kernels.sparse_attention`` (imports triton on first use)."""
    if not triton_available():
        raise ValueError(f"backend 'triton' cannot serve sparse_attention: {MISSING[_KERNEL.needs]}")
    from ..kernels import sparse_attention as mod

    return mod


def hopper_kernels():
    """The launch plans of the Hopper kernels, ``dalle_fast.kernels.hopper_plan`` (imports triton)."""
    kernels()
    from ..kernels import hopper_plan as mod

    return mod


_CHECKED: dict = {}  # problems the hopper path has validated: (shapes, strides, dtype, device, layout, scale)


def _hopper_ready(q, k, v, layout, scale):
    """q, k, v as the hopper kernels read them (unit last stride), validated once per problem."""
    K = kernels()
    key = (tuple(q.shape), q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device,
           v.device, layout, scale)
    if key not in _CHECKED:
        K.check_inputs(q, k, v, layout)
        check_scale(scale)
        _CHECKED[key] = True
    return K._unit_last(q), K._unit_last(k), K._unit_last(v)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, layout: Layout, scale: float) -> Tuple[Tensor, Tensor]:
    """(out, lse) from the Triton path :func:`dalle_fast.triton_path` picks for this call."""
    if _path.choose(q.device, q.dtype, layout, q.shape[-2], q.shape[-1]) == "hopper":
        q, k, v = _hopper_ready(q, k, v, layout, scale)
        with kernels()._on_device(q):
            return hopper_kernels().forward(q, k, v, layout, scale, q.device.type == "cpu")
    return kernels().attention_forward(q, k, v, layout, scale)


def attention_backward(grad_out, q, k, v, out, lse, layout: Layout, scale: float, grad_lse=None):
    """(dq, dk, dv) from the Triton path :func:`dalle_fast.triton_path` picks for this call."""
    if _path.choose(q.device, q.dtype, layout, q.shape[-2], q.shape[-1]) == "hopper":
        q, k, v = _hopper_ready(q, k, v, layout, scale)
        kernels().check_backward_args(grad_out, q, out, lse, grad_lse)
        grad_out = kernels()._unit_last(grad_out)
        with kernels()._on_device(q):
            return hopper_kernels().backward(grad_out, q, k, v, out, lse, layout, scale, q.device.type == "cpu",
                                             grad_lse=grad_lse)
    return kernels().attention_backward(grad_out, q, k, v, out, lse, layout, scale, grad_lse=grad_lse)


@functools.lru_cache(maxsize=1024)
def _layout(kind: int, text_len: int, image_size: int, kernel_size: int, dilation: int) -> Layout:
    if not 0 <= kind < len(KINDS):
        raise ValueError(f"kind must be in [0, {len(KINDS)}), got {kind}")
    return Layout(KINDS[kind], text_len, image_size, kernel_size, dilation)


@torch.library.custom_op("dalle_fast::triton_sparse_attention_fwd", mutates_args=())
def triton_sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, kind: int, text_len: int, image_size: int,
                                kernel_size: int, dilation: int, scale: float) -> Tuple[Tensor, Tensor]:
    """q, k, v ``(B, H, N, D)`` -> (out ``(B, H, N, D)`` contiguous in q's dtype, lse ``(B, H, N)`` float32)."""
    layout = _layout(kind, text_len, image_size, kernel_size, dilation)
    return attention_forward(q, k, v, layout, scale)


@triton_sparse_attention_fwd.register_fake
def _fwd_fake(q, k, v, kind, text_len, image_size, kernel_size, dilation, scale):
    check_static(q)
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("dalle_fast::triton_sparse_attention_bwd", mutates_args=())
def triton_sparse_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                grad_lse: Optional[Tensor], kind: int, text_len: int, image_size: int,
                                kernel_size: int, dilation: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv), each ``(B, H, N, D)`` contiguous in q's dtype. ``grad_lse`` (B, H, N) or None:
    gradient of the forward's lse output."""
    layout = _layout(kind, text_len, image_size, kernel_size, dilation)
    return attention_backward(grad_out, q, k, v, out, lse, layout, scale, grad_lse=grad_lse)


@triton_sparse_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, grad_lse, kind, text_len, image_size, kernel_size, dilation, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


register_attention_autograd("dalle_fast::triton_sparse_attention_fwd", torch.ops.dalle_fast.triton_sparse_attention_bwd)


class _EagerSparseAttention(torch.autograd.Function):
    """Eager autograd of the Triton kernels without the dispatcher round trips of the custom ops
    (the same kernels and launch plans; the ops remain what torch.compile, fake tensors, dispatch
    modes and functorch transforms see)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        out, lse = attention_forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises, as through the op
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def _plain_eager(*tensors: Tensor) -> bool:
    """True when nothing but eager autograd can observe the call: plain tensors with data (not
    meta), no torch.compile or torch.jit tracing, no dispatch mode (fake tensors, FlopCounter, ...),
    no functorch transform."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:  # compile, jit.trace
        return False
    for t in tensors:
        if type(t) is not Tensor or t.is_meta:  # meta tensors: the op's fake kernel gives shapes
            return False
    return _current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active()


def triton_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Layout, scale: float) -> Tensor:
    """Backend ``triton`` of :func:`dalle_fast.sparse_attention` (arguments already checked there).

    Plain eager calls launch the kernels directly (inference) or through a ``torch.autograd.Function``
    (training); everything else (torch.compile, fake tensors, dispatch modes, functorch) goes
    through the registered custom ops."""
    if _plain_eager(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _EagerSparseAttention.apply(q, k, v, layout, scale)
        return attention_forward(q, k, v, layout, scale)[0]
    out, _ = torch.ops.dalle_fast.triton_sparse_attention_fwd(q, k, v, *layout.params(), scale)
    return out
