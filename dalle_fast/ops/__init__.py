"""Public functional API of dalle_fast: the ops, their backends and dispatch.

Modules, each importing only those before it (and masks, reference, _checks below the op layer):
``_backend`` (the C++ extension, the backends and what each serves, dispatch, the autograd helper),
``_triton`` (the triton backend's custom ops), ``attention`` (sparse_attention), ``decode``
(decode_attention), ``sampling`` (sample), ``linear`` (the decode step's packed linear layers),
``branch`` (a decode step's residual branch as one op).
This module only re-exports.
"""

from .._checks import CPU_MAX_HEAD_DIM, CUDA_HEAD_DIMS, MAX_SCALE, TRITON_HEAD_DIMS, check_scale  # noqa: F401
from ._backend import BACKENDS, OPS, TILE_SIZES, register_attention_autograd, resolve_backend  # noqa: F401
from ._triton import kernels as triton_kernels
from ._triton import triton_available
from .attention import computed_pairs, sparse_attention
from .branch import AttentionBranch, MlpBranch
from .decode import decode_attention
from .linear import LinearPack, pack_module
from .sampling import check_error_flags, sample  # noqa: F401

__all__ = ["sparse_attention", "decode_attention", "sample", "LinearPack", "pack_module", "AttentionBranch",
           "MlpBranch", "BACKENDS",
           "resolve_backend", "computed_pairs",
           "CPU_MAX_HEAD_DIM", "CUDA_HEAD_DIMS", "TRITON_HEAD_DIMS", "triton_available", "triton_kernels"]
