"""Functional pieces shared by dalle_fast's models and adapters."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vocab_slice_cross_entropy(h: torch.Tensor, head: nn.Linear, lo: int, hi: int,
                              target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``target`` under the logits of ``head``'s output columns ``[lo, hi)`` only.

    ``h (..., dim)`` features, ``target (...)`` int64 ids in ``[0, hi - lo)`` (column ``lo + t``).
    Equal to the cross-entropy over all of ``head``'s columns with the others masked to -inf (or to
    -finfo.max, as DALLE-pytorch does), at ``(hi - lo) / out_features`` of the GEMM cost and without
    materialising the masked logits. Softmax in float32 for half-precision ``h``, else in ``h``'s dtype.
    """
    n = head.out_features
    for name, value in (("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= lo < hi <= n:
        raise ValueError(f"need 0 <= lo < hi <= head.out_features = {n}, got lo={lo}, hi={hi}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.uint8):
        # (the dtypes F.cross_entropy takes as class ids; a float tensor would be read as probabilities)
        raise ValueError(f"target must be an int64 tensor of ids, got "
                         f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != h.shape[:-1]:
        raise ValueError(f"target must have h's leading shape {tuple(h.shape[:-1])}, got {tuple(target.shape)}")
    if target.device.type == "cpu" and target.numel() and not 0 <= int(target.min()) <= int(target.max()) < hi - lo:
        # (checked on the CPU only: on a GPU the check would synchronise every training step)
        raise ValueError(f"target ids must lie in [0, hi - lo = {hi - lo}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    bias = None if head.bias is None else head.bias[lo:hi]
    logits = F.linear(h, head.weight[lo:hi], bias).flatten(0, -2)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.flatten())
