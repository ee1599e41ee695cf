"""dalle_fast: fast block-sparse attention kernels, KV-cached decoding and a thin model layer for
DALL-E-style text-to-image transformers.

    import dalle_fast
    layout = dalle_fast.Layout("row", text_len=256, image_size=32)
    out = dalle_fast.sparse_attention(q, k, v, layout)      # (batch, heads, seq, head_dim)
"""

from .version import __version__
from .masks import KINDS, Layout, paper_schedule
from .ops import decode_attention, sample, sparse_attention
from . import nn, reference

__all__ = [
    "__version__",
    "KINDS",
    "Layout",
    "paper_schedule",
    "sparse_attention",
    "decode_attention",
    "sample",
    "nn",
    "reference",
]
