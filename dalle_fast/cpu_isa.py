"""Instruction set of the CPU kernels.

The extension holds the CPU kernels once per instruction set (``default``: the architecture's
baseline, NEON on aarch64; on x86-64 also ``avx2``: AVX2 + FMA, and ``avx512``) and runs the best one
the CPU supports. ``DALLE_FAST_CPU_ISA=default|avx2|avx512`` picks a lower one for the whole process
(an error at the first kernel call if the CPU lacks it); :func:`set_cpu_isa` and :func:`use_cpu_isa`
switch at run time.

    >>> dalle_fast.cpu_isa()
    'avx512'
    >>> with dalle_fast.use_cpu_isa("avx2"):
    ...     out = dalle_fast.sparse_attention(q, k, v, layout)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

from . import ops  # noqa: F401  (loads the extension, which registers the ops used here)

__all__ = ["cpu_isa", "available_cpu_isas", "set_cpu_isa", "use_cpu_isa"]


def cpu_isa() -> str:
    """Name of the instruction set the CPU kernels run with now."""
    return torch.ops.dalle_fast._cpu_isa()


def available_cpu_isas() -> List[str]:
    """The instruction sets this build holds and this CPU runs, lowest first."""
    return list(torch.ops.dalle_fast._cpu_isas())


def set_cpu_isa(isa: str) -> None:
    """Runs the CPU kernels with ``isa`` (one of :func:`available_cpu_isas`) from now on."""
    if not isinstance(isa, str):
        raise TypeError(f"dalle_fast.set_cpu_isa: isa must be a str, got {type(isa).__name__}")
    try:
        torch.ops.dalle_fast._set_cpu_isa(isa)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None


@contextlib.contextmanager
def use_cpu_isa(isa: str) -> Iterator[None]:
    """Runs the CPU kernels with ``isa`` inside the ``with`` block, then restores the previous one."""
    previous = cpu_isa()
    set_cpu_isa(isa)
    try:
        yield
    finally:
        set_cpu_isa(previous)
