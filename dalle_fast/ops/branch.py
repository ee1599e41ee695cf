"""The CPU decode step's residual branches, one op call each (csrc/decode_branch_cpu_impl.cpp).

A pre-norm transformer layer is two branches, ``residual + layer_scale * norm_out(core(shift(norm(x))))``:
attention (packed ``to_qkv``, rotary embedding, :func:`dalle_fast.decode_attention` on the layer's
caches, packed ``to_out``) and the feed-forward net (packed linear, GELU or GEGLU, packed linear).
From Python a branch is ~25 torch ops, each 3-10 us of dispatch at the step's few rows; as one op it
is one call. :class:`AttentionBranch` and :class:`MlpBranch` hold a branch's weights and call the op:
each linear layer a :class:`dalle_fast.ops.LinearPack` (packed once per generation, the AVX2 /
AVX-512 kernel) or an ``nn.Linear`` (its weight as is, torch's GEMM: the baseline instruction set).
Float32 on the CPU; image positions only (the decode step's).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..masks import Layout
from ._backend import resolve_backend
from .linear import LinearPack

__all__ = ["AttentionBranch", "MlpBranch", "layer_norm_args"]


@torch.library.register_fake("dalle_fast::decode_attention_branch")
def _attention_branch_fake(x, residual, *args):
    return residual.new_empty(residual.shape)


@torch.library.register_fake("dalle_fast::decode_mlp_branch")
def _mlp_branch_fake(x, residual, *args):
    return residual.new_empty(residual.shape)


def _linear(layer, name: str):
    """``(weight, bias, out_features)`` op arguments of a LinearPack (its packed weight) or an
    ``nn.Linear`` (its weight)."""
    if isinstance(layer, LinearPack):
        return layer.packed, layer.bias, layer.out_features
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), layer.out_features
    raise ValueError(f"{name} must be a LinearPack or an nn.Linear, got {type(layer).__name__}")


def layer_norm_args(norm: nn.Module, dim: int):
    """``(weight, bias, eps)`` of an ``nn.LayerNorm`` over the last ``dim`` features (float32, weights
    detached), or None for any other module (the branch op computes exactly that norm)."""
    if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (dim,):
        return None
    w = None if norm.weight is None else norm.weight.detach()
    b = None if getattr(norm, "bias", None) is None else norm.bias.detach()
    return w, b, float(norm.eps)


def _ends(dim: int, norm: nn.Module, norm_out: Optional[nn.Module], layer_scale: Optional[torch.Tensor],
          shift: Optional[Tuple[torch.Tensor, int, int]]) -> tuple:
    """The op arguments of a branch's ends: input norm, optional output norm (``None``: identity),
    optional layer scale ``(dim,)``, optional token shift ``(history, top, left)``."""
    pre = layer_norm_args(norm, dim)
    post = None if norm_out is None else layer_norm_args(norm_out, dim)
    if pre is None or (norm_out is not None and post is None):
        raise ValueError("norm and norm_out must be nn.LayerNorm over the model's features")
    scale = None if layer_scale is None else layer_scale.detach().reshape(-1).contiguous()
    history, top, left = shift if shift is not None else (None, 0, 0)
    return (*pre, post is not None, *(post or (None, None, 0.0)), scale, history, top, left)


class AttentionBranch:
    """``branch(x, residual, pos)``: ``x``, ``residual`` ``(rows, 1, dim)`` float32, ``pos`` the 0-dim
    int64 image position being fed -> ``residual + layer_scale * norm_out(attention(shift(norm(x))))``.
    ``to_qkv``, ``to_out``: :class:`LinearPack` or ``nn.Linear``.
    ``cache``: the layer's :class:`dalle_fast.engine.KVCache` (read at each call: its tensors exist
    after the prefill). ``rotary``: ``(cos, sin)`` tables ``(positions, rot)``, sin with the pairs'
    sign folded in (even features negated), applied to q, k and v; or None."""

    def __init__(self, *, dim: int, norm: nn.Module, norm_out: Optional[nn.Module] = None,
                 layer_scale: Optional[torch.Tensor] = None, shift: Optional[Tuple[torch.Tensor, int, int]] = None,
                 to_qkv, heads: int, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 cache, layout: Layout, scale: Optional[float] = None, to_out) -> None:
        qkv_w, qkv_b, n_qkv = _linear(to_qkv, "to_qkv")
        out_w, out_b, _ = _linear(to_out, "to_out")
        if n_qkv % (3 * heads):
            raise ValueError(f"to_qkv: out_features {n_qkv} is not 3 x heads = {3 * heads} x head_dim")
        head_dim = n_qkv // (3 * heads)
        self.ends = _ends(dim, norm, norm_out, layer_scale, shift)
        self.qkv = (qkv_w, qkv_b, heads)
        self.rotary = (None, None) if rotary is None else tuple(t.contiguous() for t in rotary)
        self.cache = cache
        self.layout = (*layout.params(), 1.0 / math.sqrt(head_dim) if scale is None else float(scale))
        self.out = (out_w, out_b)

    @staticmethod
    def serves(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a model on ``device`` in ``dtype`` can decode with the branch ops: float32 on the CPU,
        with decode_attention resolving to the ``cpu`` backend (not a forced other one)."""
        return (device.type == "cpu" and dtype == torch.float32
                and resolve_backend(None, device, op="decode_attention") == "cpu")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.cache
        return torch.ops.dalle_fast.decode_attention_branch(
            x, residual, *self.ends, *self.qkv, *self.rotary, c.k, c.v, pos, c.text_k, c.text_v, c.prompt_index,
            *self.layout, *self.out)


class MlpBranch:
    """``branch(x, residual, pos)`` -> ``residual + layer_scale * norm_out(w2(act(w1(shift(norm(x))))))``
    with ``act`` GELU (erf form) or, ``geglu=True``, GEGLU (the first half of ``w1``'s output times the
    GELU of the second). ``text_len``/``image_size``: the token shift's geometry."""

    def __init__(self, *, dim: int, norm: nn.Module, norm_out: Optional[nn.Module] = None,
                 layer_scale: Optional[torch.Tensor] = None, shift: Optional[Tuple[torch.Tensor, int, int]] = None,
                 w1, w2, geglu: bool, text_len: int, image_size: int) -> None:
        w1_w, w1_b, n1 = _linear(w1, "w1")
        w2_w, w2_b, _ = _linear(w2, "w2")
        hidden = n1 // 2 if geglu else n1
        self.ends = _ends(dim, norm, norm_out, layer_scale, shift)
        self.geometry = (text_len, image_size)
        self.net = (w1_w, w1_b, hidden, bool(geglu), w2_w, w2_b)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.ops.dalle_fast.decode_mlp_branch(x, residual, *self.ends, pos, *self.geometry, *self.net)
