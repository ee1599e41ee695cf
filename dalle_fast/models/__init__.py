"""Model layer: discrete VAE, CLIP reranker, DALL-E transformer."""
from .clip import CLIP, CLIPConfig
from .dalle import DALLE, DALLEConfig
from .dvae import DVAE, DVAEConfig, codebook_usage

__all__ = ["CLIP", "CLIPConfig", "DALLE", "DALLEConfig", "DVAE", "DVAEConfig", "codebook_usage"]


def __getattr__(name):  # dalle_fast.models.dvae_openai (the OpenAI weight converter) on first use
    if name == "dvae_openai":
        import importlib
        return importlib.import_module(f"{__name__}.dvae_openai")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
