"""Shared test helpers. Every test runs on CPU; GPU tests skip with a reason without a GPU."""


import os

import pytest
import torch

import dalle_fast

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


def kernel_isas():
    """Instruction sets the CPU kernel tests run with: $DALLE_FAST_CPU_ISA when set, else every one
    this CPU runs (so an AVX-512 machine also tests the AVX2 and baseline kernels)."""
    forced = os.environ.get("DALLE_FAST_CPU_ISA")
    return [forced] if forced else dalle_fast.available_cpu_isas()


@pytest.fixture(scope="module", params=kernel_isas(), ids=lambda isa: f"isa={isa}")
def every_cpu_isa(request):
    """Runs a module's tests once per instruction set of the CPU kernels (pytestmark usefixtures)."""
    with dalle_fast.use_cpu_isa(request.param):
        yield request.param
