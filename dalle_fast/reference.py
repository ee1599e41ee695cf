"""Plain PyTorch references for every dalle_fast op (dense, slow, obviously correct).

They compute in the input dtype's "reference precision": float32 inputs (and lower) are upcast to
float32, float64 stays float64. Tests compare kernels against the float64 result and measure the
tolerance by what this float32 reference itself reaches against float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .masks import Layout

__all__ = ["sparse_attention", "sparse_attention_lse"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_attention_lse(q, k, v, layout: Layout, scale: Optional[float] = None, compute_dtype=None):
    """Dense masked attention. q, k, v: ``(B, H, N, D)``. Returns ``(out (B,H,N,D), lse (B,H,N))``.

    ``out`` is in ``compute_dtype`` (default: float64 for float64 inputs, else float32) and ``lse``
    is the natural-log log-sum-exp of the scaled, masked scores of each query row.
    """
    n = q.shape[-2]
    dt = compute_dtype or _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = layout.dense_mask(n, device=q.device)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.to(dt)), lse


def sparse_attention(q, k, v, layout: Layout, scale: Optional[float] = None, compute_dtype=None):
    """Dense masked attention, output cast back to the input dtype unless ``compute_dtype`` is given.

    Differentiable (plain autograd through the dense computation).
    """
    out, _ = sparse_attention_lse(q, k, v, layout, scale, compute_dtype)
    return out if compute_dtype is not None else out.to(q.dtype)
