"""dalle_fast: fast block-sparse attention kernels, KV-cached decoding and a thin model layer for
DALL-E-style text-to-image transformers.

    import dalle_fast
    layout = dalle_fast.Layout("row", text_len=256, image_size=32)
    out = dalle_fast.sparse_attention(q, k, v, layout)      # (batch, heads, seq, head_dim)

The stable public API is ``__all__`` (docs/api.md). The ops and layouts load with the package; the
model layer, generation helpers, tokenizer and integrations load on first use (``dalle_fast.DALLE``,
``dalle_fast.generate_codes``, ``dalle_fast.integrations.dalle_pytorch``), so ``import dalle_fast``
stays light.
"""

import importlib

from .version import __version__
from .masks import KINDS, Layout, paper_schedule
from .ops import decode_attention, sample, sparse_attention
from . import decode, sampling  # noqa: F401  (dalle_fast.decode / .sampling after a plain import)
from .cpu_isa import available_cpu_isas, cpu_isa, set_cpu_isa, use_cpu_isa
from .triton_path import set_triton_path, triton_path, use_triton_path
from . import nn, reference
from .nn import SparseAttention

#: public name -> module it lives in (imported on first access)
_LAZY = {
    "DALLE": ".models", "DALLEConfig": ".models", "DVAE": ".models", "DVAEConfig": ".models",
    "CLIP": ".models", "CLIPConfig": ".models",
    "Generation": ".generate", "Pipeline": ".generate", "generate_codes": ".generate",
    "generate_images": ".generate", "load_pipeline": ".generate",
    "Tokenizer": ".tokenizer",
    "models": None, "generate": None, "engine": None, "integrations": None,
}

__all__ = [
    "__version__",
    # layouts and ops
    "KINDS",
    "Layout",
    "paper_schedule",
    "sparse_attention",
    "decode_attention",
    "sample",
    "reference",
    # instruction set of the CPU kernels
    "cpu_isa",
    "available_cpu_isas",
    "set_cpu_isa",
    "use_cpu_isa",
    # which Triton kernels a GPU call runs
    "triton_path",
    "set_triton_path",
    "use_triton_path",
    # modules
    "nn",
    "SparseAttention",
    # model layer
    "models",
    "DALLE",
    "DALLEConfig",
    "DVAE",
    "DVAEConfig",
    "CLIP",
    "CLIPConfig",
    "Tokenizer",
    # generation
    "generate",
    "Generation",
    "Pipeline",
    "generate_codes",
    "generate_images",
    "load_pipeline",
    # adapters for other codebases
    "integrations",
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'dalle_fast' has no attribute {name!r}")
    where = _LAZY[name]
    module = importlib.import_module(where or f".{name}", __name__)
    value = module if where is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
