"""Shared test helpers. Every test runs on CPU; GPU tests skip with a reason without a GPU."""


import os

import pytest
import torch

import dalle_fast

# Keep CPU tests reproducible and cheap on small machines.
torch.manual_seed(0)

# torch's on-disk compile cache does not tell apart code compiled while $ATEN_CPU_CAPABILITY restricted
# the CPU (as when an AVX-512 machine acts as an AVX2 one) from code compiled without it, and loading
# one under the other gave NaN logits and crashes: one cache directory per capability.
if os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    import getpass
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")


@pytest.fixture(autouse=True)
def _private_tuning_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty on-disk Triton tuning cache: nothing read from or left in the user's."""
    monkeypatch.setenv("DALLE_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("dalle_fast_cache")))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(ours, ref64, ref_pt, what: str, factor: float = 2.0, floor: float = 0.0):
    """flash-attention's rule: our error against the float64 reference may be at most ``factor``
    times the error PyTorch itself reaches at the same precision, plus ``floor``. ``ref_pt``:
    PyTorch's result at that precision, a tuple of them (the largest error counts), or its error
    already measured (a float)."""
    e_ours = max_err(ours, ref64)
    if isinstance(ref_pt, float):
        e_pt = ref_pt
    else:
        e_pt = max(max_err(r, ref64) for r in (ref_pt if isinstance(ref_pt, tuple) else (ref_pt,)))
    assert e_ours <= factor * e_pt + floor, (
        f"{what}: error {e_ours:.3e} vs PyTorch's {e_pt:.3e} at the same precision "
        f"(allowed {factor} x + {floor:.3e})"
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


KINDS7 = ("full", "row", "col", "conv", "axial_row", "axial_col", "conv_like")
#: a tiny DALLEConfig: 4-token captions, 4x4 image codes, 7 layers (one of each kind)
MICRO = dict(text_vocab=40, image_vocab=24, text_len=5, image_size=4, dim=32, depth=7, heads=2, dim_head=16,
             kinds=KINDS7, conv_kernel_size=3, conv_like_kernel_size=2)


def micro_dalle(seed: int = 0, **config):
    """A seeded ``DALLE`` of ``MICRO`` (updated by ``config``) in eval mode, with larger random weights
    than the init (N(0, 0.3)), so that every layer visibly shapes the logits."""
    from dalle_fast.models.dalle import DALLE, DALLEConfig
    torch.manual_seed(seed)
    m = DALLE(DALLEConfig(**{**MICRO, **config})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m
