"""CPU kernels of sparse_attention against the float64 reference, op registration, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dalle_fast
from dalle_fast import KINDS, Layout, reference
from dalle_fast.nn import SparseAttention

from conftest import assert_close_to_reference, max_err

# every test of this module runs once per instruction set of the CPU kernels (conftest.py)
pytestmark = pytest.mark.usefixtures("every_cpu_isa")


def layout_for(kind, T, S):
    return Layout(kind, T, S, kernel_size=3 if kind in ("conv", "conv_like") else 11)


def check_against_reference(layout, B, H, N, D, dtype=torch.float32, backward=True):
    """Forward and gradients of the cpu backend vs the float64 reference, flash-attention's rule."""
    q64, k64, v64 = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g64 = torch.randn(B, H, N, D, dtype=torch.float64)
    ref64 = reference.sparse_attention(q64, k64, v64, layout)
    grads64 = torch.autograd.grad(ref64, (q64, k64, v64), g64) if backward else None

    def low(t):
        return t.detach().to(dtype).requires_grad_(backward)

    # PyTorch's own result at this precision: dense reference computed in `dtype`
    q_pt, k_pt, v_pt = low(q64), low(k64), low(v64)
    ref_pt = reference.sparse_attention(q_pt, k_pt, v_pt, layout, compute_dtype=dtype)
    # ours
    q, k, v = low(q64), low(k64), low(v64)
    out = dalle_fast.sparse_attention(q, k, v, layout, backend="cpu")
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    assert_close_to_reference(out, ref64, ref_pt, f"{layout} out", floor=1e-6)
    if backward:
        grads_pt = torch.autograd.grad(ref_pt, (q_pt, k_pt, v_pt), g64.to(dtype))
        grads = torch.autograd.grad(out, (q, k, v), g64.to(dtype))
        for name, ours, ref, pt in zip("qkv", grads, grads64, grads_pt):
            assert_close_to_reference(ours, ref, pt, f"{layout} d{name}", floor=1e-5)


GRID = [
    # (B, H, T, S, N or None, D)
    (1, 1, 1, 4, None, 32),
    (3, 4, 7, 5, None, 64),
    (1, 4, 64, 8, None, 128),
    (3, 1, 7, 16, 200, 32),
    (1, 4, 64, 16, 250, 64),
    (3, 4, 1, 8, 50, 128),
    (1, 1, 64, 5, 70, 64),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,H,T,S,N,D", GRID)
def test_cpu_matches_reference(kind, B, H, T, S, N, D):
    layout = layout_for(kind, T, S)
    check_against_reference(layout, B, H, N or layout.seq_len, D)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kind", ["row", "col"])
def test_cpu_thread_counts(kind, threads):
    """Both backward strategies: a head per task (batch * heads divisible by, or >= 2x, the threads)
    and tile-parallel passes (few heads: 4 heads on 3 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(layout_for(kind, 7, 8), 1, 4, 71, 32)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
def test_cpu_bfloat16(kind):
    check_against_reference(layout_for(kind, 7, 8), 2, 3, 60, 64, dtype=torch.bfloat16)


@pytest.mark.parametrize("D", [1, 3, 17, 256])
def test_cpu_unusual_head_dims(D):
    check_against_reference(layout_for("row", 5, 4), 1, 2, 21, D)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    T=st.integers(1, 40),
    S=st.integers(1, 9),
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    D=st.integers(1, 48),
    data=st.data(),
)
def test_cpu_random_layouts_and_shapes(kind, T, S, B, H, D, data):
    layout = layout_for(kind, T, S)
    N = data.draw(st.integers(1, layout.seq_len))
    check_against_reference(layout, B, H, N, D)


def test_lse_matches_reference():
    layout = layout_for("conv", 7, 6)
    gen = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(2, 3, 40, 32, dtype=torch.float64, generator=gen) for _ in range(3))
    _, lse64 = reference.sparse_attention_lse(q, k, v, layout)
    _, lse_pt = reference.sparse_attention_lse(q.float(), k.float(), v.float(), layout)  # PyTorch at float32
    _, lse = torch.ops.dalle_fast.sparse_attention_fwd(q.float(), k.float(), v.float(), *layout.params(),
                                                       1 / math.sqrt(32))
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 40)
    # floor: one float32 ulp at the lse's magnitude, the rounding of the output itself
    ulp = torch.finfo(torch.float32).eps * lse64.abs().max().item()
    assert_close_to_reference(lse, lse64, lse_pt, "lse", floor=ulp)


def test_non_contiguous_inputs_are_handled():
    layout = layout_for("row", 7, 5)
    B, N, H, D = 2, layout.seq_len, 3, 32
    qkv = torch.randn(B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views with odd strides
    assert not q.is_contiguous()
    out = dalle_fast.sparse_attention(q, k, v, layout)
    ref = reference.sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    assert max_err(out, ref) < 1e-5
    # the backward reads the same strided views (saved as given): gradients of the fused qkv
    # tensor against float64, flash-attention's rule
    g = torch.randn(B, H, N, D)

    def qkv_grad(x, fn):
        x = x.detach().requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        fn(q, k, v).backward(g.to(x.dtype))
        return x.grad

    ours = qkv_grad(qkv, lambda q, k, v: dalle_fast.sparse_attention(q, k, v, layout, backend="cpu"))
    ref64 = qkv_grad(qkv.double(), lambda q, k, v: reference.sparse_attention(q, k, v, layout))
    ref_pt = qkv_grad(qkv, lambda q, k, v: reference.sparse_attention(q, k, v, layout))
    assert_close_to_reference(ours, ref64, ref_pt, "d(qkv) through strided views", floor=1e-5)


def test_inputs_not_modified():
    layout = layout_for("col", 5, 4)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, requires_grad=True) for _ in range(3))
    saved = [t.detach().clone() for t in (q, k, v)]
    dalle_fast.sparse_attention(q, k, v, layout).sum().backward()
    for t, s in zip((q, k, v), saved):
        assert torch.equal(t.detach(), s)


def test_opcheck():
    layout = layout_for("conv", 5, 4)
    q, k, v = (torch.randn(2, 2, 19, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd.default,
                          (q, k, v, *layout.params(), 0.25))
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), 0.25)
    g = torch.randn_like(out)
    for grad_lse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd.default,
                              (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), grad_lse,
                               *layout.params(), 0.25))


@pytest.mark.parametrize("kind", ["row", "col"])
def test_lse_output_is_differentiable(kind):
    """Gradients through both outputs of the op (d lse / d score = softmax) match float64."""
    layout = layout_for(kind, 7, 5)
    q64, k64, v64 = (torch.randn(2, 3, 29, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g_out, g_lse = torch.randn(2, 3, 29, 16, dtype=torch.float64), torch.randn(2, 3, 29, dtype=torch.float64)
    o64, l64 = reference.sparse_attention_lse(q64, k64, v64, layout)
    ref = torch.autograd.grad([o64, l64], (q64, k64, v64), [g_out, g_lse])
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o32, l32 = reference.sparse_attention_lse(q32, k32, v32, layout)
    base = torch.autograd.grad([o32, l32], (q32, k32, v32), [g_out.float(), g_lse.float()])
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), 0.25)
    grads = torch.autograd.grad([out, lse], (q, k, v), [g_out.float(), g_lse.float()])
    for name, ours, r, b in zip("qkv", grads, ref, base):
        assert_close_to_reference(ours, r, b, f"d{name}", floor=1e-5)


def test_torch_compile_fullgraph():
    layout = layout_for("row", 7, 4)
    attn = SparseAttention(32, 2, 16, layout)

    def step(x):
        return attn(x).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, layout.seq_len, 32, requires_grad=True)
    loss = compiled(x)
    loss.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    step(x).backward()
    assert torch.allclose(loss, step(x))
    assert torch.allclose(g_compiled, x.grad, atol=1e-6)


def test_sparse_attention_module():
    layout = layout_for("col", 6, 4)
    attn = SparseAttention(48, 3, 16, layout)
    x = torch.randn(2, layout.seq_len, 48)
    y = attn(x)
    q, k, v = attn.qkv(x)
    ref = reference.sparse_attention(q, k, v, layout)
    expected = attn.to_out(ref.transpose(1, 2).reshape(2, layout.seq_len, 48))
    assert y.shape == x.shape and max_err(y, expected) < 1e-5
    # `expected` reuses attn.qkv; independently of it, changing token j changes exactly the outputs
    # of the queries the mask lets read key j (a projection that mixed positions would leak)
    reach = layout.dense_mask()
    for j in (0, 5, layout.text_len + 3, layout.seq_len - 1):
        x2 = x.clone()
        x2[:, j] += 1.0
        changed = (attn(x2) - y).abs().amax(-1) > 1e-6  # (B, N)
        assert torch.equal(changed, reach[:, j].expand(2, -1)), j
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(layout.seq_len, 48))
    with pytest.raises(ValueError, match="dim = 48"):  # not a matmul shape error from inside
        attn(torch.randn(2, layout.seq_len, 47))
    with pytest.raises(ValueError, match="heads"):
        SparseAttention(48, 0, 16, layout)


def test_backend_selection(monkeypatch):
    layout = layout_for("row", 4, 3)
    q = torch.randn(1, 1, layout.seq_len, 8, dtype=torch.float64)
    # float64 is served by the reference backend only; cpu says why
    with pytest.raises(ValueError, match="float64"):
        dalle_fast.sparse_attention(q, q, q, layout)
    monkeypatch.setenv("DALLE_FAST_BACKEND", "reference")
    out = dalle_fast.sparse_attention(q, q, q, layout)
    assert out.dtype == torch.float64
    monkeypatch.setenv("DALLE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        dalle_fast.sparse_attention(q, q, q, layout)
    monkeypatch.delenv("DALLE_FAST_BACKEND")
    with pytest.raises(ValueError, match="cuda"):
        dalle_fast.sparse_attention(q.float(), q.float(), q.float(), layout, backend="cuda")


def test_bad_inputs():
    layout = layout_for("row", 4, 3)
    N = layout.seq_len
    q = torch.randn(1, 2, N, 8)
    with pytest.raises(ValueError, match="q must be"):
        dalle_fast.sparse_attention(q[0], q[0], q[0], layout)
    with pytest.raises(ValueError, match="k must have q's shape"):
        dalle_fast.sparse_attention(q, q[:, :1], q, layout)
    with pytest.raises(ValueError, match="v must have q's dtype"):
        dalle_fast.sparse_attention(q, q, q.bfloat16(), layout)
    with pytest.raises(ValueError, match="q: backend 'cpu' supports dtype"):
        dalle_fast.sparse_attention(q.long(), q.long(), q.long(), layout)
    with pytest.raises(ValueError, match="device"):
        dalle_fast.sparse_attention(q, q.to("meta"), q, layout)
    with pytest.raises(ValueError, match="seq"):
        long = torch.randn(1, 2, N + 1, 8)
        dalle_fast.sparse_attention(long, long, long, layout)
    with pytest.raises(ValueError, match="head_dim"):
        wide = torch.randn(1, 1, 4, 257)
        dalle_fast.sparse_attention(wide, wide, wide, layout)
    with pytest.raises(ValueError, match="layout"):
        dalle_fast.sparse_attention(q, q, q, "row")
    with pytest.raises(ValueError, match="scale"):
        dalle_fast.sparse_attention(q, q, q, layout, scale=0.0)
    # the op itself checks too (TORCH_CHECK_VALUE: a ValueError), naming the argument
    with pytest.raises(ValueError, match="kind"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, 9, 4, 3, 11, 1, 1.0)
    with pytest.raises(ValueError, match="seq"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, 1, 2, 2, 11, 1, 1.0)
    with pytest.raises(ValueError, match="kernel_size"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, 3, 4, 3, 4, 1, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_keys_propagate_like_the_reference(bad):
    """A NaN (or +inf) key makes exactly the rows that attend to it NaN, as in the float64
    reference: the vectorised max and exp must not drop it (AVX-512 max returns its second operand
    for a NaN, and a clamp written the other way round turned a NaN score into a weight of 2^-126)."""
    layout = layout_for("row", 4, 4)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    k[0, 1, 2, 0] = bad
    ours = dalle_fast.sparse_attention(q, k, v, layout, backend="cpu")
    ref = reference.sparse_attention(q.double(), k.double(), v.double(), layout)
    assert torch.equal(ours.isnan(), ref.isnan()) and ref.isnan().any()
    ok = ~ref.isnan()
    assert max_err(ours[ok], ref[ok]) < 1e-5


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e8])
@pytest.mark.parametrize("heads", [1, 2])  # 1: the query-tile-major dQ pass; 2: whole-head tasks
@pytest.mark.parametrize("head_dim", [16, 64])
def test_huge_scores_keep_forward_and_gradients_accurate(scale, heads, head_dim):
    """Scores far beyond any sane logit (scale up to 1e8) neither overflow the forward (the max is
    subtracted before scaling) nor put error into the recomputed softmax of the backward (scores
    scaled and rounded exactly as the forward rounded their max into lse; delta = rowsum(dO * O)
    rounded as the GEMM rounds dP, so that dP - delta cancels exactly where P is one-hot)."""
    layout = layout_for("row", 4, 4)
    g = torch.Generator().manual_seed(0)
    x64 = [torch.randn(1, heads, 20, head_dim, generator=g, dtype=torch.float64) for _ in range(4)]

    def run(backend, dtype):
        t = [a.detach().to(dtype).requires_grad_() for a in x64[:3]]
        out = dalle_fast.sparse_attention(*t, layout, scale=scale, backend=backend)
        out.backward(x64[3].to(dtype))
        return [out.detach()] + [a.grad for a in t]

    ref64, ref32, ours = run("reference", torch.float64), run("reference", torch.float32), run("cpu", torch.float32)
    for name, o, r, b in zip(["out", "dq", "dk", "dv"], ours, ref64, ref32):
        assert torch.isfinite(o).all(), name
        assert_close_to_reference(o, r, b, name, floor=1e-5)


def test_double_backward_raises():
    """The C++ backward op has no derivative: differentiating the gradients raises instead of
    returning zeros (PyTorch's fallback for an op without an autograd kernel)."""
    layout = layout_for("row", 4, 3)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 8, requires_grad=True) for _ in range(3))
    out = dalle_fast.sparse_attention(q, k, v, layout, backend="cpu")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match="double backward"):
        sum(g.sum() for g in grads).backward()
