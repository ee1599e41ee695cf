"""KV-cached decode attention: :mod:`dalle_fast.ops.decode`, also importable from here."""

from ._checks import CUDA_HEAD_DIMS  # noqa: F401
from .ops.decode import DECODE_BACKENDS, _resolve, decode_attention  # noqa: F401

__all__ = ["decode_attention"]
