"""Attention layer on dalle_fast.sparse_attention."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..masks import Layout, _positive_int
from ..ops import sparse_attention


class SparseAttention(nn.Module):
    """Multi-head self-attention with a DALL-E layout: qkv projection, sparse attention, output projection.

    Args:
        dim: model width (input and output features).
        heads: number of heads.
        dim_head: features per head.
        layout: the layer's :class:`dalle_fast.Layout`.
        bias: whether the projections have biases.
        backend: forced op backend (default: by device / ``$DALLE_FAST_BACKEND``).

    Shapes: ``x (batch, seq, dim) -> (batch, seq, dim)`` with ``seq <= layout.seq_len``; dtypes and
    devices are those of :func:`dalle_fast.sparse_attention` for the chosen backend (CPU: float32,
    bfloat16, float16; CUDA via triton: float16, bfloat16, float32 with ``dim_head`` 32/64/128).
    :meth:`qkv` gives the projected q, k, v; ``forward`` with a ``cache`` runs a KV-cached prefill or
    decode step (:class:`dalle_fast.engine.KVCache`, :func:`dalle_fast.decode_attention`).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, layout: Layout, *, bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            _positive_int(name, value)
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a dalle_fast.Layout, got {type(layout).__name__}")
        self.heads, self.dim_head, self.layout, self.backend = heads, dim_head, layout, backend
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)

    def qkv(self, x: torch.Tensor, proj=None):
        """Projects ``x (B, N, dim)`` to q, k, v, each ``(B, heads, N, dim_head)`` (with ``proj``, the
        packed ``to_qkv`` of a decode step)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.to_qkv.in_features:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (batch, seq, dim = {self.to_qkv.in_features}), got {got}")
        b, n, _ = x.shape
        qkv = (self.to_qkv if proj is None else proj)(x).view(b, n, 3, self.heads, self.dim_head)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, cache=None, pos: Optional[torch.Tensor] = None,
                index: Optional[int] = None, packs=None) -> torch.Tensor:
        """``x (B, N, dim)``. With a :class:`dalle_fast.engine.KVCache` ``cache`` (generation): ``pos``
        None is the prefill of the prompts' text, else one token per row at position ``pos`` (0-dim
        int64 device tensor; ``index`` is the same position on the host). ``packs``: ``to_qkv`` and
        ``to_out`` packed for a decode step (:func:`dalle_fast.ops.pack_module`), or None."""
        q, k, v = self.qkv(x, None if packs is None else packs[0])
        if cache is None:
            out = sparse_attention(q, k, v, self.layout, backend=self.backend)
        elif pos is None:
            out = cache.prefill(q, k, v, self.layout, backend=self.backend)
        else:
            out = cache.decode(q, k, v, pos, index, self.layout)
        b, h, n, d = out.shape
        return (self.to_out if packs is None else packs[1])(out.transpose(1, 2).reshape(b, n, h * d))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, layout={self.layout}"
