"""The backends' declared capabilities (dalle_fast.ops._backend) agree with what the kernels take,
and dispatch explains a refusal."""

from __future__ import annotations

import pytest
import torch

import dalle_fast
from dalle_fast import _checks
from dalle_fast.ops import _backend
from dalle_fast.ops._backend import OPS, Kernel, require

HAS_CUDA = torch.cuda.is_available()


def _layout():
    return dalle_fast.Layout("row", 2, 2)


def test_cpu_head_dim_limit_is_the_extensions():
    layout = _layout()
    q = torch.randn(1, 1, layout.seq_len, _checks.CPU_MAX_HEAD_DIM)
    torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, *layout.params(), 0.1)
    q = torch.randn(1, 1, layout.seq_len, _checks.CPU_MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match=f"head_dim must be in \\[1, {_checks.CPU_MAX_HEAD_DIM}\\]"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, *layout.params(), 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_dtypes_are_the_extensions(dtype):
    layout = _layout()
    q = torch.randn(2, 1, layout.seq_len, 8).to(dtype)
    kc = torch.zeros(2, 1, layout.seq_len, 8, dtype=dtype)
    logits = torch.randn(2, 10).to(dtype)
    calls = (
        lambda: torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, *layout.params(), 0.1),
        lambda: torch.ops.dalle_fast.decode_attention(q[:, :, :1], q[:, :, :1], q[:, :, :1], kc, kc.clone(),
                                                      torch.tensor([0, 1]), None, None, None, *layout.params(),
                                                      0.1),
        lambda: torch.ops.dalle_fast.sample(logits, torch.tensor([1, 2]), torch.tensor(0), None, 1.0, 1.0, 0, 1.0,
                                            0, 10),
    )
    for op, call in zip(("sparse_attention", "decode_attention", "sample"), calls):
        declared = OPS[op].kernels["cpu"].dtypes
        if dtype in declared:
            call()
        else:
            with pytest.raises(ValueError, match="dtype|float32"):
                call()


def test_triton_facts_are_shared():
    pytest.importorskip("triton")
    from dalle_fast.kernels import sparse_attention as K

    assert K.HEAD_DIMS is _checks.TRITON_HEAD_DIMS and K.DTYPES is _checks.TRITON_DTYPES
    assert OPS["sparse_attention"].kernels["triton"].head_dims is _checks.TRITON_HEAD_DIMS


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_cuda_decode_head_dims_are_the_extensions(head_dim):
    layout = _layout()
    q = torch.randn(2, 1, 1, head_dim, device="cuda")
    kc = torch.zeros(2, 1, layout.seq_len, head_dim, device="cuda")
    call = lambda: torch.ops.dalle_fast.decode_attention(q, q, q, kc, kc.clone(),  # noqa: E731
                                                         torch.tensor([0, 1], device="cuda"), None, None, None,
                                                         *layout.params(), 0.1)
    if head_dim in _checks.CUDA_HEAD_DIMS:
        call()
    else:
        with pytest.raises(ValueError):
            call()


def test_every_op_declares_every_backend_it_resolves_to():
    for op in OPS.values():
        assert op.kernels["reference"].why_not(torch.device("cpu"), torch.float64, 1000) is None
        assert set(op.kernels) <= set(_backend.BACKENDS)
        assert op.default(torch.device("cpu")) == "cpu" and op.cuda_default in op.kernels
    assert dalle_fast.decode.DECODE_BACKENDS == ("reference", "cpu", "cuda")
    assert dalle_fast.sampling.SAMPLE_BACKENDS == ("reference", "cpu", "cuda")


def test_refusals_say_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match=r"backend 'cpu' needs CPU tensors, got cuda; use backend='triton'"):
        require("sparse_attention", ("cpu",), cuda, torch.float32, 64)
    with pytest.raises(ValueError, match="backend 'cpu' supports head_dim up to 256, got head_dim=257"):
        require("sparse_attention", ("cpu",), cpu, torch.float32, 257)
    with pytest.raises(ValueError, match="use backend='reference' for float64"):
        require("decode_attention", ("cpu",), cpu, torch.float64, 8)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve sparse_attention: .*no CUDA C\\+\\+ kernel"):
        require("sparse_attention", ("cuda",), cuda, torch.float16, 64)
    # several candidates: the first that serves wins, else every reason
    assert require("sparse_attention", ("cpu", "reference"), cpu, torch.float64, 8) == "reference"
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU .*; backend 'cuda' cannot serve"):
        require("sparse_attention", ("cpu", "cuda"), cuda, torch.float16, 64)


def test_a_missing_need_is_the_reason(monkeypatch):
    monkeypatch.setitem(_backend.MISSING, "triton", "the triton package is not installed")
    kernel = OPS["sparse_attention"].kernels["triton"]
    assert kernel.why_not(torch.device("cuda"), torch.float16, 64) == \
        "cannot serve sparse_attention: the triton package is not installed"
    q = torch.randn(1, 1, 6, 32)
    with pytest.raises(ValueError, match="triton package is not installed"):
        dalle_fast.sparse_attention(q, q, q, _layout(), backend="triton")
    assert Kernel("x", "reference", "reference").why_not(torch.device("meta"), torch.int8) is None
