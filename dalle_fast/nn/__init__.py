"""nn.Modules built on dalle_fast ops."""

from . import functional  # noqa: F401  (dalle_fast.nn.functional after a plain import)
from .attention import SparseAttention

__all__ = ["SparseAttention"]
