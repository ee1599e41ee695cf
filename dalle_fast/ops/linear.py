"""The decode step's linear layers on the CPU: a weight packed once per generation into column
panels, then ``x @ weight.T + bias`` for the step's few rows by the C++ kernel (csrc/cpu/linear.cpp).

At the step's shapes (rows = the generation's rows, 1 to a few dozen) torch's CPU GEMM reaches
30-80 GFLOP/s on two cores; the packed kernel 100-200 (bench/RESULTS.md). Float32 on the CPU with
the AVX2 or AVX-512 kernels: elsewhere the models call their ``nn.Linear`` as usual
(:meth:`LinearPack.serves`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["LinearPack", "pack_module", "step_parts"]

PANEL = 16  # columns per panel (csrc/cpu/linear.h)


@torch.library.register_fake("dalle_fast::pack_linear_weight")
def _pack_fake(weight):
    n, k = weight.shape
    return weight.new_empty(((n + PANEL - 1) // PANEL, k, PANEL))


@torch.library.register_fake("dalle_fast::packed_linear")
def _packed_linear_fake(x, packed, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


class LinearPack:
    """``weight (out_features, in_features)`` and ``bias`` of a linear layer, the weight packed for the
    decode step's kernel (a copy: made at the start of a generation, so later changes to the weight
    need a new pack). ``pack(x)``: ``x (..., in_features) -> (..., out_features)``, float32 CPU, no
    autograd (generation runs without gradients)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        self.out_features = weight.shape[0]
        self.packed = torch.ops.dalle_fast.pack_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    @classmethod
    def of(cls, linear: nn.Linear) -> "LinearPack":
        return cls(linear.weight, linear.bias)

    @staticmethod
    def serves(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the packed kernel serves a model on ``device`` in ``dtype``: float32 on the CPU with
        the AVX2 or AVX-512 kernels active. The baseline build (SSE2 on x86-64, NEON on aarch64) computes
        the same but was measured at 4-5 GFLOP/s on x86-64 (bench/RESULTS.md), far below torch's GEMM."""
        return (device.type == "cpu" and dtype == torch.float32
                and torch.ops.dalle_fast._cpu_isa() in ("avx2", "avx512"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dalle_fast.packed_linear(x, self.packed, self.bias, self.out_features)


class _PackedModule:
    def __init__(self, parts) -> None:
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


def pack_module(module: nn.Module):
    """An ``nn.Linear``, or an ``nn.Sequential`` of them and parameter-free modules (activations,
    dropout, GEGLU), as a callable that runs it with each linear layer packed (:class:`LinearPack`).
    Dropout in eval mode is the identity and is left out (a module call per step saved)."""
    if isinstance(module, nn.Linear):
        return LinearPack.of(module)
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"module must be an nn.Linear or nn.Sequential, got {type(module).__name__}")
    return _PackedModule([LinearPack.of(m) if isinstance(m, nn.Linear) else m for m in step_parts(module)])


def step_parts(module) -> list:
    """What a decode step runs of ``module``, in order: the parts of a :func:`pack_module` result, the
    modules of an ``nn.Sequential`` without its eval-mode dropout (the identity), or ``[module]``."""
    if isinstance(module, _PackedModule):
        return list(module.parts)
    if isinstance(module, nn.Sequential):
        return [m for m in module if not (isinstance(m, nn.Dropout) and not m.training)]
    return [module]
