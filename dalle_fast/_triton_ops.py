"""The triton backend's custom ops: :mod:`dalle_fast.ops._triton`, also importable from here."""

from .ops._triton import (DTYPES, HEAD_DIMS, hopper_kernels, kernels, triton_available,  # noqa: F401
                          triton_sparse_attention)

__all__ = ["triton_available", "kernels", "triton_sparse_attention", "HEAD_DIMS", "DTYPES"]
