"""Triton kernels of dalle_fast (installed as ``dalle_fast.kernels``)."""
