"""Model layer: discrete VAE, CLIP reranker (and, later, the DALL-E transformer)."""
from .clip import CLIP, CLIPConfig
from .dvae import DVAE, DVAEConfig, codebook_usage

__all__ = ["CLIP", "CLIPConfig", "DVAE", "DVAEConfig", "codebook_usage"]
