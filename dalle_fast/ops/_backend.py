"""Bottom of the op layer: the C++ extension, the backends each op has and what each serves, and
the dispatch that picks one for a call.

Every (op, backend) pair is a :class:`Kernel` that declares the device types, dtypes and head dims
it serves and what it needs (the C++ extension's CPU or CUDA kernels, the triton package, or
nothing for the PyTorch reference); :meth:`Kernel.why_not` says why it cannot serve a call.
:func:`select` tries the candidates of a call in order and returns the first that can serve it,
else raises a ``ValueError`` with every candidate's reason. The candidates are exactly one backend:
``backend=``, else ``$DALLE_FAST_BACKEND`` where it serves the op, else the device's default, so
nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .._checks import (CPU_MAX_HEAD_DIM, CUDA_HEAD_DIMS, KERNEL_DTYPES, TRITON_DTYPES, TRITON_HEAD_DIMS,
                       dtype_names)

__all__ = ["BACKENDS", "TILE_SIZES", "MISSING", "Kernel", "OPS", "resolve_backend", "select", "require",
           "register_attention_autograd"]

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: (query, key) tile sizes each block-sparse backend computes with (cpu: read from the extension)
TILE_SIZES: Dict[str, tuple] = {}


def _load_extension():
    try:
        from .. import _C  # registers the ops with the dispatcher
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "dalle_fast._C is not built: install dalle_fast with `pip install --no-build-isolation .` "
            f"(or `python setup.py build_ext --inplace` for development). Original error: {e}"
        ) from e
    TILE_SIZES["cpu"] = (_C.CPU_TILE_M, _C.CPU_TILE_N)


_load_extension()


# ---------------------------------------------------------------------------------------------
# what each backend needs, found once at import (no dispatcher query or find_spec per call)
# ---------------------------------------------------------------------------------------------
def _cuda_built(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA")


#: need -> why it is missing (None: present). The extension's CPU kernels load with this module.
MISSING: Dict[str, Optional[str]] = {
    "reference": None,
    "cpu_ext": None,
    "triton": None if importlib.util.find_spec("triton") is not None else "the triton package is not installed",
}
for _op in ("sparse_attention_fwd", "decode_attention", "sample"):
    MISSING[f"cuda_ext:{_op}"] = None if _cuda_built(_op) else "this build of dalle_fast._C has no CUDA kernels"


@dataclass(frozen=True)
class Kernel:
    """One backend of one op and what it serves. ``devices`` None: any device (the kernels check
    the device themselves); ``dtypes`` None: any floating dtype; ``head_dims`` / ``max_head_dim``
    None: any head_dim. ``absent``: this backend has no kernel for the op (why)."""

    op: str
    backend: str
    needs: str
    devices: Optional[Tuple[str, ...]] = None
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    head_dims: Optional[Tuple[int, ...]] = None
    max_head_dim: Optional[int] = None
    absent: Optional[str] = None

    def why_not(self, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None) -> Optional[str]:
        """Why this kernel cannot serve a call on ``device`` in ``dtype`` (with ``head_dim``), or None."""
        if self.absent is not None:
            return f"cannot serve {self.op}: {self.absent}"
        missing = MISSING[self.needs]
        if missing is not None:
            return f"cannot serve {self.op}: {missing}"
        if self.devices is not None and device.type not in self.devices:
            wanted = " or ".join(d.upper() for d in self.devices)
            return f"needs {wanted} tensors, got {device}; use backend={OPS[self.op].default(device)!r}"
        if self.dtypes is not None and dtype not in self.dtypes:
            hint = "; use backend='reference' for float64" if dtype == torch.float64 else ""
            return f"supports dtype {dtype_names(self.dtypes)}, got {dtype}{hint}"
        if head_dim is not None:
            if self.head_dims is not None and head_dim not in self.head_dims:
                return f"supports head_dim in {self.head_dims}, got head_dim={head_dim}"
            if self.max_head_dim is not None and head_dim > self.max_head_dim:
                return f"supports head_dim up to {self.max_head_dim}, got head_dim={head_dim}"
        return None


@dataclass(frozen=True)
class Op:
    """An op's backends (name -> :class:`Kernel`) and its default on non-CPU devices."""

    name: str
    kernels: Dict[str, Kernel]
    cuda_default: str

    def default(self, device: torch.device) -> str:
        return "cpu" if device.type == "cpu" else self.cuda_default


def _op(name: str, cuda_default: str, *kernels: Kernel) -> Op:
    return Op(name, {k.backend: k for k in kernels}, cuda_default)


_REFERENCE = dict(needs="reference")  # PyTorch, dense: any device and floating dtype

#: every op's backends and what each serves
OPS: Dict[str, Op] = {op.name: op for op in (
    _op("sparse_attention", "triton",
        Kernel("sparse_attention", "reference", **_REFERENCE),
        Kernel("sparse_attention", "cpu", "cpu_ext", devices=("cpu",), dtypes=KERNEL_DTYPES,
               max_head_dim=CPU_MAX_HEAD_DIM),
        # CUDA tensors (CPU tensors under TRITON_INTERPRET=1): the kernels' host code checks the device
        Kernel("sparse_attention", "triton", "triton", dtypes=TRITON_DTYPES, head_dims=TRITON_HEAD_DIMS),
        Kernel("sparse_attention", "cuda", "cuda_ext:sparse_attention_fwd",
               absent="sparse attention has no CUDA C++ kernel; use backend='triton'")),
    _op("decode_attention", "cuda",
        Kernel("decode_attention", "reference", **_REFERENCE),
        Kernel("decode_attention", "cpu", "cpu_ext", devices=("cpu",), dtypes=KERNEL_DTYPES),
        Kernel("decode_attention", "cuda", "cuda_ext:decode_attention", devices=("cuda",), dtypes=KERNEL_DTYPES,
               head_dims=CUDA_HEAD_DIMS)),
    _op("sample", "cuda",
        Kernel("sample", "reference", **_REFERENCE),
        Kernel("sample", "cpu", "cpu_ext", devices=("cpu",), dtypes=KERNEL_DTYPES),
        Kernel("sample", "cuda", "cuda_ext:sample", devices=("cuda",), dtypes=KERNEL_DTYPES)),
)}


def resolve_backend(backend: Optional[str], device: torch.device, *, op: str = "sparse_attention",
                    served: Optional[Sequence[str]] = None, cuda_default: Optional[str] = None) -> str:
    """The backend a call of ``op`` uses: ``backend`` if given; else ``$DALLE_FAST_BACKEND`` when it
    names a backend that serves ``op`` (so choosing ``triton`` globally leaves the decoding ops on
    their CUDA kernels); else ``cpu`` for CPU tensors and the op's default for other devices.
    ``served`` / ``cuda_default`` default to the op's declaration in :data:`OPS`."""
    if served is None:
        served = tuple(OPS[op].kernels)
    if cuda_default is None:
        cuda_default = OPS[op].cuda_default
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
        raise ValueError(f"backend {backend!r} has no {op} kernel; the backends serving it are {tuple(served)}")
    return backend


def require(op: str, names: Sequence[str], device: torch.device, dtype: torch.dtype,
            head_dim: Optional[int] = None, arg: str = "q") -> str:
    """The first of backends ``names`` whose kernel of ``op`` serves the call; else ValueError with
    every one's reason, naming ``arg``, the tensor whose device, dtype and head dim were judged."""
    kernels = OPS[op].kernels
    reasons = []
    for name in names:
        why = kernels[name].why_not(device, dtype, head_dim)
        if why is None:
            return name
        reasons.append(f"backend {name!r} {why}")
    raise ValueError(f"{arg}: " + "; ".join(reasons))


def select(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype,
           head_dim: Optional[int] = None, arg: str = "q") -> str:
    """The backend serving this call of ``op`` (:func:`resolve_backend`, then :func:`require`)."""
    return require(op, (resolve_backend(backend, device, op=op),), device, dtype, head_dim, arg)


# ---------------------------------------------------------------------------------------------
# autograd of the attention ops (the C++ and the Triton ones)
# ---------------------------------------------------------------------------------------------
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
