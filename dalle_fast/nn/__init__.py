"""nn.Modules built on dalle_fast ops."""

from .attention import SparseAttention

__all__ = ["SparseAttention"]
