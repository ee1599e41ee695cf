"""dalle_fast: fast sparse-attention kernels and a thin model layer for DALL-E-style transformers."""
