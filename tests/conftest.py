"""Shared test helpers. Every test runs on CPU; GPU tests skip with a reason without a GPU."""


import pytest
import torch

# Keep CPU tests reproducible and cheap on small machines.
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_tuning_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty on-disk Triton tuning cache: nothing read from or left in the user's."""
    monkeypatch.setenv("DALLE_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("dalle_fast_cache")))


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(ours, ref64, ref_pt, what: str, factor: float = 2.0, floor: float = 0.0):
    """flash-attention's rule: our error against the float64 reference may be at most ``factor``
    times the error PyTorch itself reaches at the same precision (``ref_pt``), plus ``floor``."""
    e_ours = max_err(ours, ref64)
    e_pt = max_err(ref_pt, ref64)
    assert e_ours <= factor * e_pt + floor, (
        f"{what}: error {e_ours:.3e} vs PyTorch's {e_pt:.3e} at the same precision "
        f"(allowed {factor} x + {floor:g})"
    )
