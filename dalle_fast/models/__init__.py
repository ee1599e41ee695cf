"""Model layer: discrete VAE, CLIP reranker, DALL-E transformer."""
from .clip import CLIP, CLIPConfig
from .dalle import DALLE, DALLEConfig
from .dvae import DVAE, DVAEConfig, codebook_usage

__all__ = ["CLIP", "CLIPConfig", "DALLE", "DALLEConfig", "DVAE", "DVAEConfig", "codebook_usage"]
