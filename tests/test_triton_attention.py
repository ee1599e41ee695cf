"""Triton block-sparse attention (backend 'triton') against the float64 dense reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (set below, before the
kernels are defined), with 16 x 16 tiles and tiny, awkward shapes. With a GPU the same tests run on
CUDA tensors in float32, float16 and bfloat16, plus torch.compile, CUDA-graph and tile-config tests.

Tolerance (flash-attention's rule): the kernel's max error against the float64 reference must be
within a small multiple of the error PyTorch itself reaches at the same precision: the dense
reference computed in float32 for float32 inputs (factor 3: same precision, another summation
order; for the gradients, the larger of autograd's error and that of the kernels' own formula, see
_base), and computed entirely in float16/bfloat16 for those inputs (factor 2, plus the rounding of
the reference values to that dtype, as flash-attention 3's tests add).
"""

import json
import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import dalle_fast  # noqa: E402
from conftest import assert_close_to_reference, max_err  # noqa: E402
from dalle_fast import Layout, reference  # noqa: E402

triton = pytest.importorskip("triton")
from dalle_fast.kernels import sparse_attention as K  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
ALL_KINDS = dalle_fast.KINDS



@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """Grid tests use the fixed default tile configs (autotuning is tested separately)."""
    monkeypatch.setenv("DALLE_FAST_TRITON_AUTOTUNE", "0")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _inputs(b, h, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype) for _ in range(4)]


def _dense(q, k, v, do, layout, compute_dtype):
    """Reference out and grads with autograd through the dense computation in ``compute_dtype``."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.sparse_attention_lse(*leaves, layout, compute_dtype=compute_dtype)
    grads = torch.autograd.grad(out, leaves, do.to(compute_dtype))
    return out.detach(), lse.detach(), grads


def _flash_grads(q, k, v, do, layout, out, lse):
    """float32 dq, dk, dv by the kernels' (flash-attention's) formula: delta = rowsum(dO * out)."""
    q, k, v, do = (t.float() for t in (q, k, v, do))
    scale = q.shape[-1] ** -0.5
    mask = layout.dense_mask(q.shape[-2], device=q.device)
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - lse.unsqueeze(-1)).masked_fill(~mask, 0.0)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * out).sum(-1, keepdim=True))
    dq, dk = torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, torch.matmul(p.transpose(-1, -2), do)


def _base(q, k, v, do, layout, dtype):
    """PyTorch at ``dtype``: out, lse and grads; in float32 each grad is a pair (autograd's, the
    kernels' formula's)."""
    out, lse, grads = _dense(q, k, v, do, layout, dtype)
    if dtype != torch.float32:
        return out, lse, grads
    # autograd's delta sums its own rounded dp, whose rounding then cancels in dp - delta (exactly on a
    # one-key row); the kernels' delta = rowsum(dO * O) keeps it, so PyTorch's error by that formula counts too
    return out, lse, tuple(zip(grads, _flash_grads(q, k, v, do, layout, out, lse)))


def _triton(q, k, v, do, layout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = dalle_fast.sparse_attention(*leaves, layout, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), grads


def _assert_close(name, got, ref64, base, dtype):
    """|got - ref64| <= factor * |base - ref64| (+ rounding of ref64 to dtype for 16-bit dtypes); ``base``:
    PyTorch's result at dtype, or a tuple of them (the largest error counts)."""
    if dtype == torch.float32:
        assert_close_to_reference(got, ref64, base, name, factor=3)
    else:
        assert_close_to_reference(got, ref64, base, name, factor=2, floor=2 * max_err(ref64.to(dtype), ref64))


def _check_against_reference(layout, b, h, n, d, dtype, seed=0):
    q, k, v, do = _inputs(b, h, n, d, dtype, seed)
    ref, ref_lse, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base_dtype = torch.float32 if dtype == torch.float32 else dtype
    base, base_lse, base_grads = _base(q, k, v, do, layout, base_dtype)
    out, grads = _triton(q, k, v, do, layout)
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close("out", out, ref, base, dtype)
    for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert g.dtype == dtype and g.shape == q.shape
        _assert_close(name, g, rg, bg, dtype)


# text_len 7 / image_size 5 and text_len 20 / image_size 6 (conv kernel 3): neither text_len nor
# the run lengths are multiples of any tile; 29 stops inside an image row (partial column runs).
# On a GPU the head_dim-32 case runs in float32 and the head_dim-64 case in bfloat16 and float16
# (every compiled variant costs GPU-check time); the interpreter runs both in float32 (its dots are
# numpy float32 whatever the dtype, so 16-bit runs there would test nothing more).
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [
    # (b, h, text_len, image_size, kernel_size, seq, head_dim, dtype)
    pytest.param(2, 3, 7, 5, 3, 29, 32, _F32, id="T7-S5-n29-d32-float32"),
]
if HAS_CUDA:
    SHAPES += [
        pytest.param(2, 3, 20, 6, 3, 56, 64, _BF16, id="T20-S6-n56-d64-bfloat16"),
        pytest.param(2, 3, 20, 6, 3, 56, 64, _F16, id="T20-S6-n56-d64-float16"),
    ]
else:
    SHAPES += [pytest.param(2, 3, 20, 6, 3, 56, 64, _F32, id="T20-S6-n56-d64-float32")]


# ------------------------------------------------------------------------------------------------
# correctness against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h,t,s,ks,n,d,dtype", SHAPES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_matches_reference(kind, b, h, t, s, ks, n, d, dtype):
    _check_against_reference(Layout(kind, t, s, kernel_size=ks), b, h, n, d, dtype)


@pytest.mark.parametrize(
    "layout,b,h,n,d",
    [
        pytest.param(Layout("conv_like", 9, 6, kernel_size=3, dilation=2), 1, 2, 45, 32, id="conv_like-dil2"),
        pytest.param(Layout("conv", 3, 7, kernel_size=5), 1, 1, 52, 32, id="conv-K5-b1-h1"),
        pytest.param(Layout("full", 5, 4, kernel_size=1), 1, 2, 21, 128, id="full-d128"),
        pytest.param(Layout("col", 1, 4), 2, 1, 3, 32, id="col-n3"),
    ],
)
def test_more_layouts(layout, b, h, n, d):
    _check_against_reference(layout, b, h, n, d, torch.float32, seed=1)


def test_lse_output():
    layout = Layout("conv", 7, 5, kernel_size=3)
    q, k, v, _ = _inputs(2, 3, 32, 32, torch.float32, seed=2)
    _, lse = torch.ops.dalle_fast.triton_sparse_attention_fwd(q, k, v, *layout.params(), 32 ** -0.5)
    _, ref_lse = reference.sparse_attention_lse(q.double(), k.double(), v.double(), layout)
    _, base_lse = reference.sparse_attention_lse(q, k, v, layout)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 32)
    _assert_close("lse", lse, ref_lse, base_lse, torch.float32)


def test_lse_gradient():
    """The op's lse output is differentiable too (d lse / d score = softmax)."""
    layout = Layout("col", 7, 5)
    q, k, v, do = _inputs(1, 2, 29, 32, torch.float32, seed=10)
    g = torch.Generator().manual_seed(11)
    dlse = torch.randn(1, 2, 29, generator=g).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.dalle_fast.triton_sparse_attention_fwd(*leaves, *layout.params(), 32 ** -0.5)
    grads = torch.autograd.grad([out, lse], leaves, [do, dlse])
    for dt, store in ((torch.float64, "ref"), (torch.float32, "base")):
        ls = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o, l = reference.sparse_attention_lse(*ls, layout, compute_dtype=dt)
        gs = torch.autograd.grad([o, l], ls, [do.to(dt), dlse.to(dt)])
        if store == "ref":
            ref_grads = gs
        else:
            base_grads = gs
    for name, got, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _assert_close(name, got, rg, bg, torch.float32)


# ------------------------------------------------------------------------------------------------
# strides, errors, tables
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["row", "col"])
def test_strided_views_match_contiguous(kind):
    """(B, N, H, D) views of a fused qkv projection, transposed to (B, H, N, D), need no copy and
    give the same result (bit for bit) as contiguous inputs; so do non-unit head_dim strides."""
    layout = Layout(kind, 7, 5)
    b, n, h, d = 2, 32, 3, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert q.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE)
    out_c, grads_c = _triton(q.contiguous(), k.contiguous(), v.contiguous(), do, layout)
    out_s, grads_s = _triton(q, k, v, do.transpose(1, 2).contiguous().transpose(1, 2), layout)
    assert torch.equal(out_s, out_c)
    for gs, gc in zip(grads_s, grads_c):
        assert torch.equal(gs, gc)
    wide = torch.randn(b, h, n, 2 * d, generator=g).to(DEVICE)
    q2 = wide[..., ::2]  # head_dim stride 2: copied inside the launcher
    out_w, _ = _triton(q2, k, v, do, layout)
    out_wc, _ = _triton(q2.contiguous(), k, v, do, layout)
    assert torch.equal(out_w, out_wc)


def test_bad_head_dim():
    q = torch.randn(1, 1, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        dalle_fast.sparse_attention(q, q, q, Layout("row", 4, 2), backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        torch.ops.dalle_fast.triton_sparse_attention_fwd(q, q, q, *Layout("row", 4, 2).params(), 1.0)


def test_bad_dtype_and_seq():
    q = torch.randn(1, 1, 8, 32, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        dalle_fast.sparse_attention(q, q, q, Layout("row", 4, 2), backend="triton")
    q = torch.randn(1, 1, 9, 32, device=DEVICE)
    with pytest.raises(ValueError, match="seq"):
        torch.ops.dalle_fast.triton_sparse_attention_fwd(q, q, q, *Layout("row", 4, 2).params(), 1.0)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter check applies to CPU tensors")
def test_interpreter_version_clash_is_a_clear_error(monkeypatch):
    """Triton < 3.7's interpreter fails on NumPy >= 2.4 deep inside a kernel; the call says why."""
    for tv, nv in (("3.6.0", "2.4.6"), ("3.5.1", "2.5.0")):
        with pytest.raises(RuntimeError, match=r"numpy<2.4.*triton >= 3.7"):
            K._check_interpreter(tv, nv)
    for tv, nv in (("3.7.1", "2.4.6"), ("3.6.0", "2.3.5"), ("3.8.0+git1a2b", "2.5.0"), ("4.0.0", "3.0")):
        assert K._check_interpreter(tv, nv) is None
    # the public call reaches the check (a shape no other test plans, so it is checked afresh)
    monkeypatch.setattr(K.triton, "__version__", "3.6.0")
    monkeypatch.setattr(K.np, "__version__", "2.4.0")
    q = torch.randn(1, 1, 7, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 cannot run"):
        dalle_fast.sparse_attention(q, q, q, Layout("row", 3, 2), backend="triton")


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, dalle_fast; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_packed_tables_match_tile_tables_and_are_cached():
    layout = Layout("col", 7, 5)
    n = 29
    perm, tables, permuted = K.prepare_tables(layout, n, DEVICE)
    again = K.prepare_tables(layout, n, DEVICE)
    assert again[0] is perm and again[1] is tables and permuted
    packed = layout.packed_tile_tables(n, K.TILES)
    assert torch.equal(packed.perm.long(), layout.permutation(n))
    for bm, bn in [(16, 16), (32, 128), (128, 64)]:
        assert (bm, bn) in K.TILES
        tt = layout.tile_table(n, bm, bn)
        _, lut, counts, num_full, t_lut, t_counts, t_num_full = tt.padded()
        lut_off, width, cnt_off, nf_off, t_lut_off, t_width, t_cnt_off, t_nf_off = packed.record(bm, bn)
        tab = packed.tables
        assert torch.equal(tab[lut_off:lut_off + lut.numel()].view(-1, width), lut)
        assert torch.equal(tab[cnt_off:cnt_off + counts.numel()], counts)
        assert torch.equal(tab[nf_off:nf_off + num_full.numel()], num_full)
        assert torch.equal(tab[t_lut_off:t_lut_off + t_lut.numel()].view(-1, t_width), t_lut)
        assert torch.equal(tab[t_cnt_off:t_cnt_off + t_counts.numel()], t_counts)
        assert torch.equal(tab[t_nf_off:t_nf_off + t_num_full.numel()], t_num_full)
    assert packed.record(48, 16) == [-1] * 8
    with pytest.raises(ValueError, match="block_m"):
        layout.packed_tile_tables(n, ((24, 16),))


# ------------------------------------------------------------------------------------------------
# torch.library / compile / CUDA graphs
# ------------------------------------------------------------------------------------------------
def test_opcheck():
    layout = Layout("col", 7, 5)
    q, k, v, do = _inputs(1, 2, 20, 32, torch.float32, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dalle_fast.triton_sparse_attention_fwd.default,
                          (q, k, v, *layout.params(), 0.2))
    out, lse = torch.ops.dalle_fast.triton_sparse_attention_fwd(q.detach(), k.detach(), v.detach(),
                                                                 *layout.params(), 0.2)
    torch.library.opcheck(torch.ops.dalle_fast.triton_sparse_attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), out, lse, None, *layout.params(), 0.2))


def test_eager_path_matches_custom_op():
    """Plain eager calls bypass the dispatcher (autograd.Function over the same kernels): bit for
    bit the outputs and gradients of the registered op, which dispatch modes still see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layout = Layout("col", 7, 5)
    q, k, v, do = _inputs(2, 3, 29, 32, torch.float32, seed=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = dalle_fast.sparse_attention(*leaves, layout, backend="triton")
    assert type(out.grad_fn).__name__ == "_EagerSparseAttentionBackward"
    grads = torch.autograd.grad(out, leaves, do)
    op_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op_out, _ = torch.ops.dalle_fast.triton_sparse_attention_fwd(*op_leaves, *layout.params(), 32 ** -0.5)
    op_grads = torch.autograd.grad(op_out, op_leaves, do)
    assert torch.equal(out, op_out)
    for g, og in zip(grads, op_grads):
        assert torch.equal(g, og)
    with torch.no_grad():
        assert torch.equal(dalle_fast.sparse_attention(q, k, v, layout, backend="triton"), out)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        seen = dalle_fast.sparse_attention(q, k, v, layout, backend="triton")
    assert "dalle_fast.triton_sparse_attention_fwd.default" in rec.ops
    assert torch.equal(seen, out)
    with warnings.catch_warnings():  # jit.trace is deprecated; its shape-check TracerWarnings
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda q, k, v: dalle_fast.sparse_attention(q, k, v, layout, backend="triton"),
                                 (q, k, v))
    assert "dalle_fast::triton_sparse_attention_fwd" in str(traced.graph)
    assert torch.equal(traced(q, k, v), out)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, deferred init) go through the op's fake kernel, autograd too."""
    q = torch.randn(2, 3, 29, 32, device="meta", requires_grad=True)
    out = dalle_fast.sparse_attention(q, q, q, Layout("col", 7, 5), backend="triton")
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and q.grad.device.type == "meta"


def test_double_backward_raises_on_both_paths():
    """No second-order formula: differentiating the gradient raises (on the eager path too, where
    an unmarked autograd.Function would silently drop the term)."""
    layout = Layout("row", 7, 5)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 32, 32, torch.float32, seed=17)[:3])
    eager = dalle_fast.sparse_attention(q, k, v, layout, backend="triton")
    op, _ = torch.ops.dalle_fast.triton_sparse_attention_fwd(q, k, v, *layout.params(), 32 ** -0.5)
    for out, match in ((eager, "once_differentiable"), (op, "double backward .* not supported")):
        g, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match=match):
            (g.square().sum() + q.sum()).backward()


def test_launch_plans_are_cached_per_problem(monkeypatch):
    """A problem is checked and planned once; new strides or shapes get their own plan; bad inputs
    raise every time and leave no plan behind."""
    monkeypatch.setattr(K, "_PLANS", {})
    planned = []
    real = K._fwd_plan
    monkeypatch.setattr(K, "_fwd_plan", lambda *a: planned.append(1) or real(*a))
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, 32, 32, torch.float32, seed=13)
    first, _ = K.attention_forward(q, k, v, layout, 0.2)
    again, _ = K.attention_forward(q, k, v, layout, 0.2)
    assert len(planned) == 1 and torch.equal(first, again)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(K.attention_forward(qt, k, v, layout, 0.2)[0], first)
    assert len(planned) == 2
    K.attention_forward(q[:, :, :20], k[:, :, :20], v[:, :, :20], layout, 0.2)
    assert len(planned) == 3
    for _ in range(2):
        with pytest.raises(ValueError, match="seq"):
            K.attention_forward(*(torch.randn(1, 2, 33, 32, device=DEVICE) for _ in range(3)), layout, 0.2)
    assert len(K._PLANS) == 3
    out, lse = first, K.attention_forward(q, k, v, layout, 0.2)[1]
    for _ in range(2):
        with pytest.raises(ValueError, match="lse"):
            K.attention_backward(q, q, k, v, out, lse[:, :1], layout, 0.2)
    assert len(K._PLANS) == 3


def _compile_case(backend):
    layout = Layout("conv", 7, 5, kernel_size=3)
    q, k, v, do = _inputs(1, 2, 32, 32, torch.float32, seed=5)

    def f(q, k, v):
        return dalle_fast.sparse_attention(q, k, v, layout, backend="triton") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    out_e, grads_e = _triton(q, k, v, do * 2.0, layout)
    torch.testing.assert_close(out, out_e * 2.0, rtol=0, atol=0)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge, rtol=0, atol=0)


def test_compile_fullgraph_aot_eager():
    """Fake kernels and autograd registration hold up under dynamo/AOTAutograd (any device)."""
    torch._dynamo.reset()
    _compile_case("aot_eager")


@pytest.mark.gpu
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _compile_case("inductor")


@pytest.mark.gpu
def test_cuda_graph_capture_replay():
    layout = Layout("col", 20, 6)
    q, k, v, do = _inputs(2, 3, 56, 64, torch.bfloat16, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = dalle_fast.sparse_attention(*leaves, layout, backend="triton")
        return (out,) + torch.autograd.grad(out, leaves, do)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile kernels, build and upload tables
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    fresh = _inputs(2, 3, 56, 64, torch.bfloat16, seed=7)
    for leaf, new in zip(leaves, fresh[:3]):
        leaf.data.copy_(new)
    do.copy_(fresh[3])
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grads = _triton(*fresh, layout)
    for got, want in zip(static, (eager_out,) + tuple(eager_grads)):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_every_tile_config():
    """Each autotuning candidate is correct (autotuning may pick any of them); col: gathered rows
    through the permutation, partial tiles at both ends of the runs."""
    layout = Layout("col", 20, 6)
    dtype = torch.bfloat16
    q, k, v, do = _inputs(2, 2, 56, 64, dtype, seed=8)
    ref, _, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base, _, base_grads = _dense(q, k, v, do, layout, dtype)
    scale = 64 ** -0.5
    heavy = K.ORDER_HEAVY
    for cfg in K.FWD_CONFIGS + tuple(c._replace(order=heavy) for c in K.FWD_CONFIGS) + K.FLAT_FWD_CONFIGS:
        out, lse = K.attention_forward(q, k, v, layout, scale, config=cfg)
        _assert_close(f"out {cfg}", out, ref, base, dtype)
    pairs = list(zip(K.DKDV_CONFIGS, K.DQ_CONFIGS))
    for cfg_dkdv, cfg_dq in pairs + [(a._replace(order=heavy), b._replace(order=heavy)) for a, b in pairs]:
        dq, dk, dv = K.attention_backward(do, q, k, v, out, lse, layout, scale, configs=(cfg_dkdv, cfg_dq))
        for name, g, rg, bg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads):
            _assert_close(f"{name} {cfg_dkdv} {cfg_dq}", g, rg, bg, dtype)


@pytest.mark.skipif(HAS_CUDA, reason="test_every_tile_config covers every candidate on a GPU")
@pytest.mark.parametrize("layout", [Layout("col", 40, 10), Layout("conv", 40, 10, kernel_size=3)], ids=str)
def test_rectangular_tiles_interpreted(layout):
    """Under the interpreter, tiles other than the 16 x 16 default: BLOCK_M != BLOCK_N in both
    directions, several full and partial tiles per table row, a run (131) that ends inside a tile
    and inside an image row; col through the permutation."""
    n, dtype = 131, torch.float32
    q, k, v, do = _inputs(1, 2, n, 32, dtype, seed=11)
    ref, _, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base, _, base_grads = _base(q, k, v, do, layout, dtype)
    scale = 32 ** -0.5
    tall, wide = K.TileConfig(64, 32, 4, 1), K.TileConfig(32, 64, 4, 1)
    for cfg in (tall, wide):
        out, lse = K.attention_forward(q, k, v, layout, scale, config=cfg)
        _assert_close(f"out {cfg}", out, ref, base, dtype)
    for configs in ((tall, wide), (wide, tall), (K.TileConfig(16, 128, 4, 1), tall)):
        grads = K.attention_backward(do, q, k, v, out, lse, layout, scale, configs=configs)
        for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
            _assert_close(f"{name} {configs}", g, rg, bg, dtype)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_program_order_changes_nothing_but_the_order(kind):
    """Tile-major program order (``ORDER_HEAVY``) computes every tile exactly as the batch*head-major
    order does: bit-identical out, lse and gradients, for every kind, with batch*heads (6) and tile
    counts (4 query tiles of 16, the last partial; 56 = 20 text + 6 x 6) that divide nothing; and
    both match the float64 reference."""
    layout = Layout(kind, 20, 6, **({"kernel_size": 3} if kind in ("conv", "conv_like") else {}))
    n, dtype, scale = 56, torch.float32, 32 ** -0.5
    q, k, v, do = _inputs(2, 3, n, 32, dtype, seed=12)
    ref, _, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base, _, base_grads = _base(q, k, v, do, layout, dtype)
    results = []
    fwd, dkdv, dq = K.default_configs(32, dtype)  # on a GPU: kernels test_matches_reference compiled
    for order in (K.ORDER_BH, K.ORDER_HEAVY):
        out, lse = K.attention_forward(q, k, v, layout, scale, config=fwd._replace(order=order))
        grads = K.attention_backward(do, q, k, v, out, lse, layout, scale,
                                     configs=(dkdv._replace(order=order), dq._replace(order=order)))
        results.append((out, lse, *grads))
        _assert_close(f"out order {order}", out, ref, base, dtype)
        for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
            _assert_close(f"{name} order {order}", g, rg, bg, dtype)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_candidates_include_both_program_orders(monkeypatch):
    monkeypatch.delenv("DALLE_FAST_TRITON_FLAT", raising=False)
    for name, base in K.CANDIDATES.items():
        cands = K._candidates(name)
        assert cands[:len(base)] == base and len(set(cands)) == len(cands) == 2 * len(base)
        assert {c._replace(order=K.ORDER_BH) for c in cands} == set(base)
    monkeypatch.setenv("DALLE_FAST_TRITON_FLAT", "1")
    cands = K._candidates("fwd")
    assert cands[-len(K.FLAT_FWD_CONFIGS):] == K.FLAT_FWD_CONFIGS and len(cands) == 2 * len(K.FWD_CONFIGS) + len(K.FLAT_FWD_CONFIGS)


_FLAT_INTERPRETED = [K.TileConfig(16, 16, 4, 1, 1), K.TileConfig(16, 16, 4, 1, 3), K.TileConfig(16, 16, 4, 1, 1000),
                     K.TileConfig(32, 64, 4, 1, 5), K.TileConfig(64, 32, 4, 1, 7)]


@pytest.mark.parametrize("layout,n", [
    pytest.param(Layout("row", 7, 5), 29, id="row-n29"),
    pytest.param(Layout("col", 40, 10), 131, id="col-n131"),
    pytest.param(Layout("conv", 20, 6, kernel_size=3), 56, id="conv-n56"),
    pytest.param(Layout("axial_col", 9, 4), 23, id="axial_col-n23"),
    pytest.param(Layout("conv_like", 9, 6, kernel_size=3, dilation=2), 45, id="conv_like-n45"),
    pytest.param(Layout("full", 5, 4), 21, id="full-n21"),
])
def test_flat_forward_matches_reference(layout, n):
    """The flat work-list forward (one loop over the (query tile, key tile) pairs of a group of
    query tiles): out and lse against float64 for groups of one query tile, a few, and all of
    them, square and rectangular tiles; the backward from its out/lse too. On a GPU: one opt-in
    candidate in bfloat16 per layout here (every candidate: test_every_tile_config)."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    q, k, v, do = _inputs(2, 3, n, 32, dtype, seed=12)
    ref, ref_lse, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base, base_lse, base_grads = _base(q, k, v, do, layout, dtype)
    scale = 32 ** -0.5
    configs = K.FLAT_FWD_CONFIGS[1:2] if HAS_CUDA else _FLAT_INTERPRETED
    for cfg in configs:
        out, lse = K.attention_forward(q, k, v, layout, scale, config=cfg)
        _assert_close(f"out {cfg}", out, ref, base, dtype)
        _assert_close(f"lse {cfg}", lse, ref_lse, base_lse, dtype)
        if not HAS_CUDA:  # same tiles, same order, same arithmetic as the per-query-tile kernel
            out_c, lse_c = K.attention_forward(q, k, v, layout, scale, config=cfg._replace(flat=0))
            assert torch.equal(out, out_c) and torch.equal(lse, lse_c), cfg
    if not HAS_CUDA:  # (on a GPU: compile time; out and lse are checked above)
        grads = K.attention_backward(do, q, k, v, out, lse, layout, scale)
        for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
            _assert_close(f"{name} after flat forward", g, rg, bg, dtype)


def test_flat_work_list():
    """Groups are consecutive whole query tiles covering every pair once, balanced to within one
    query tile's list; each code names the tile table's (query, key) pair and its flags."""
    layout, n, bm, bn = Layout("conv", 20, 6, kernel_size=3), 56, 16, 16
    tt = layout.tile_table(n, bm, bn)
    counts = (tt.row_ptr[1:] - tt.row_ptr[:-1]).tolist()
    for pairs in (1, 4, 9, 10 ** 6):
        work, groups = K.flat_work(layout, n, bm, bn, pairs, "cpu")
        assert K.flat_work(layout, n, bm, bn, pairs, "cpu")[0] is work  # cached
        work = work.long()
        starts, codes = work[:groups + 1].tolist(), work[groups + 1:]
        total = tt.nnz
        assert groups == max(1, min(tt.num_q_tiles, -(-total // pairs)))
        assert starts[0] == 0 and starts[-1] == total and starts == sorted(starts)
        assert set(starts) <= set(tt.row_ptr.tolist())  # whole query tiles
        sizes = [b - a for a, b in zip(starts, starts[1:])]
        assert max(sizes) - total / groups <= max(counts), sizes
        kt, qt = codes & 8191, (codes >> 13) & 8191
        assert torch.equal(kt, tt.col_idx.long())
        assert torch.equal(qt, torch.repeat_interleave(torch.arange(tt.num_q_tiles), torch.tensor(counts)))
        for r in range(tt.num_q_tiles):
            c = codes[tt.row_ptr[r]:tt.row_ptr[r + 1]]
            nf = int(tt.num_full[r])
            assert [bool(x & K.PAIR_PARTIAL) for x in c.tolist()] == [i >= nf for i in range(len(c))]
            assert [bool(x & K.PAIR_FIRST) for x in c.tolist()] == [i == 0 for i in range(len(c))]


def test_flat_candidates_are_opt_in(monkeypatch):
    monkeypatch.delenv("DALLE_FAST_TRITON_FLAT", raising=False)
    assert not any(c.flat for c in K._candidates("fwd"))
    monkeypatch.setenv("DALLE_FAST_TRITON_FLAT", "1")
    assert set(K.FLAT_FWD_CONFIGS) <= set(K._candidates("fwd"))
    assert not any(c.flat for c in K._candidates("dq") + K._candidates("dkdv"))


@pytest.mark.gpu
def test_autotuned_at_paper_size(monkeypatch):
    """The autotuned path at the paper's sequence (text 256 + 32 x 32), bfloat16, col layer."""
    monkeypatch.setenv("DALLE_FAST_TRITON_AUTOTUNE", "1")
    _check_against_reference(Layout("col", 256, 32), 1, 2, 1280, 64, torch.bfloat16, seed=9)


_XCOMPILE = r'''
import torch
from dalle_fast.kernels import sparse_attention as K
from dalle_fast.kernels.resources import KERNELS, compile_for_hopper, resources
from dalle_fast import KINDS
assert not K.INTERPRET
# bfloat16, every head_dim: row, col (permuted gathers) and conv (the busiest element mask), all three
# kernels, each in its default configuration; float32 (IEEE dots, slow to compile): col
CASES = [(torch.bfloat16, d, kind, 3) for d in K.HEAD_DIMS for kind in ("row", "col", "conv")]
CASES += [(torch.float32, d, "col", 3) for d in (64, 128)]
bad = []
for dtype, d, kind, nk in CASES:
    for (name, fn), cfg in list(zip(KERNELS.items(), K.default_configs(d, dtype)))[:nk]:
        r = resources(compile_for_hopper(fn, dtype, KINDS.index(kind), d, cfg))
        print(name, kind, dtype, d, tuple(cfg), r)
        if r["stack"] or r["local"]:
            bad.append(f"{name} {kind} {dtype} head_dim {d} {tuple(cfg)} spills: {r}")
        if dtype != torch.float32 and not (r["ldgsts"] and r["hgmma"]):
            bad.append(f"{name} {kind} {dtype} head_dim {d} {tuple(cfg)}: no async copies or no wgmma: {r}")
        if r["wgmma_serialized"]:
            bad.append(f"{name} {kind} {dtype} head_dim {d} {tuple(cfg)}: ptxas serialized its wgmmas")
        # a streamed tile prefetched less than num_stages - 1 ahead (at 2 stages Triton single-buffers)
        if cfg.num_stages >= 3 and r["tile_buffers"] < cfg.num_stages:
            bad.append(f"{name} {kind} {dtype} head_dim {d} {tuple(cfg)}: tiles buffered {r['tile_buffers']} deep")
        # the forward default held below the programs per SM its shared memory allows by its registers
        if cfg.maxnreg and (r["regs"] > cfg.maxnreg or K.occupancy_cap(r["regs"], cfg.num_warps, r["smem"], K.HOPPER)):
            bad.append(f"{name} {kind} {dtype} head_dim {d} {tuple(cfg)}: register-limited: {r}")
# col's 4-warp dK/dV candidates: serialized (C7515) while the kernel had two loops (full, partial)
for cfg in (K.TileConfig(32, 64, 4, 3), K.TileConfig(64, 64, 4, 3)):
    r = resources(compile_for_hopper(KERNELS["dkdv"], torch.bfloat16, KINDS.index("col"), 64, cfg))
    if r["wgmma_serialized"] or r["stack"]:
        bad.append(f"dkdv col {tuple(cfg)}: {r}")
# register caps the tuner derives (occupancy_cap, an H100's SM): ptxas keeps them, and the 8-warp
# 128 x 64 forward (row, conv; flat: row) and dQ (row) fit them without spilling (bfloat16, head_dim
# 64; dQ conv may spill under a cap, and the tuner skips it where it does). Which of them are
# register-limited depends on the Triton release (docs/design-notes.md, "Register caps"); at least one is.
derived = 0
for name, cfg, kinds in (("fwd", K.TileConfig(128, 64, 8, 3), ("row", "conv")),
                         ("fwd", K.TileConfig(128, 64, 8, 4), ("row", "conv")),
                         ("dq", K.TileConfig(128, 64, 8, 3), ("row", "conv")),
                         ("fwd_flat", K.TileConfig(128, 64, 8, 3, 16), ("row",))):
    for kind in kinds:
        c = compile_for_hopper(KERNELS[name], torch.bfloat16, KINDS.index(kind), 64, cfg)
        r = resources(c)
        cap = K.occupancy_cap(r["regs"], cfg.num_warps, c.metadata.shared, K.HOPPER)
        if not cap:
            continue
        derived += 1
        r = resources(compile_for_hopper(KERNELS[name], torch.bfloat16, KINDS.index(kind), 64, cfg._replace(maxnreg=cap)))
        print(name, kind, tuple(cfg), "cap", cap, r)
        clean = not (r["stack"] or r["local"] or r["wgmma_serialized"]) or (name, kind) == ("dq", "conv")
        if r["regs"] > cap or not clean:
            bad.append(f"{name} {kind} {tuple(cfg)} capped at {cap}: {r}")
if not derived:
    bad.append("no register-limited 8-warp 128 x 64 candidate: the derived caps were not compiled")
# the opt-in flat forward's candidates (bfloat16, head_dim 64; col: permuted): the same requirements
for kind in ("row", "col"):
    for cfg in K.FLAT_FWD_CONFIGS:
        r = resources(compile_for_hopper(KERNELS["fwd_flat"], torch.bfloat16, KINDS.index(kind), 64, cfg))
        print("fwd_flat", kind, tuple(cfg), r)
        if r["stack"] or r["local"] or r["wgmma_serialized"] or r["tile_buffers"] < cfg.num_stages:
            bad.append(f"fwd_flat {kind} {tuple(cfg)}: {r}")
assert not bad, "\n".join(bad)
print("compiled")
'''


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_hopper():
    """Without a GPU: the kernels (not the interpreter) lower to sm_90a code with this Triton, and
    every default configuration (what runs before tuning, under CUDA-graph capture and with tuning
    off) keeps its registers (no spills), uses asynchronous copies and warpgroup MMAs, and buffers
    every streamed tile ``num_stages`` deep (the table lookups do not eat pipeline stages)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", _XCOMPILE], env=env, capture_output=True, text=True)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas available to this Triton")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _tuning_on(monkeypatch, candidates):
    """Tuning on CPU: autotuning forced on for these forward candidates, fresh in-memory caches."""
    monkeypatch.setattr(K, "_autotune_enabled", lambda dtype: True)
    monkeypatch.setitem(K.CANDIDATES, "fwd", candidates)
    # exactly these (not also in the tile-major order, test_candidates_include_both_program_orders)
    monkeypatch.setattr(K, "_candidates", lambda name: K.CANDIDATES[name])
    monkeypatch.setattr(K, "_BEST", {})
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K, "TUNING_LOG", [])


def _fake_tuning(monkeypatch, timings):
    """Two candidates (16 x 16, 64 x 32), do_bench faked: a real launch, then ``timings`` in call
    order. Returns (small, wide, list of timed calls)."""
    small, wide = K.TileConfig(16, 16, 4, 1), K.TileConfig(64, 32, 4, 1)
    _tuning_on(monkeypatch, (small, wide))
    timed = []

    def fake_bench(fn, warmup, rep):
        fn()  # a real launch of the candidate
        timed.append(1)
        return timings[len(timed) - 1]

    monkeypatch.setattr(K.triton.testing, "do_bench", fake_bench)
    return small, wide, timed


def test_tuner_picks_fastest_and_caches(monkeypatch):
    """The per-problem tuner times every candidate once, launches the fastest, and afterwards only
    looks it up (timing faked on CPU: the candidate with 64 x 32 tiles is reported fastest)."""
    small, wide, timed = _fake_tuning(monkeypatch, [5.0, 1.0])
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=3)
    out, _ = K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 2 and list(K._BEST.values()) == [wide]
    assert K.last_forward_tiles(torch.float32, 32) == (64, 32)
    ref = reference.sparse_attention(q.double(), k.double(), v.double(), layout, 0.25)
    assert max_err(out, ref) < 1e-5
    K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 2  # cached: no second tuning


def test_tuner_skips_spilling_configs(monkeypatch):
    """A candidate whose compiled kernel spills registers is not timed while others do not spill
    (spills read from the compiled kernel Triton returns; faked here, where the interpreter returns
    none), even when it would time fastest."""
    small, spiller = K.TileConfig(16, 16, 4, 1), K.TileConfig(64, 32, 4, 1)
    _tuning_on(monkeypatch, (spiller, small))
    real_run = K._run

    class Compiled:
        def __init__(self, n_spills):
            self.n_spills = n_spills

    def run(launch, args):
        real_run(launch, args)
        return Compiled(16 if launch.config == spiller else 0)

    monkeypatch.setattr(K, "_run", run)
    timed = []

    def fake_bench(fn, warmup, rep):
        compiled = fn()
        timed.append(compiled.n_spills)
        return 0.5 if compiled.n_spills else 2.0

    monkeypatch.setattr(K.triton.testing, "do_bench", fake_bench)
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=14)
    K.attention_forward(q, k, v, layout, 0.25)
    assert timed == [0] and list(K._BEST.values()) == [small]
    log = {e["config"]: e for e in K.TUNING_LOG}
    assert log[small]["ms"] == 2.0 and log[spiller]["ms"] is None and log[spiller]["n_spills"] == 16
    assert log[spiller]["note"].startswith("spills")
    # when every candidate spills, the fastest of them is taken
    monkeypatch.setitem(K.CANDIDATES, "fwd", (spiller,))
    K.clear_caches()
    timed.clear()
    K.attention_forward(q, k, v, layout, 0.25)
    assert timed == [16] and list(K._BEST.values()) == [spiller]


def test_occupancy_cap():
    """Register caps that fit one more program per Hopper SM (register counts of sm_90a kernels as
    bench/RESULTS.md lists them), and none where registers are not what limits it."""
    H = K.HOPPER
    assert K.programs_per_sm(147, 8, 65536, H) == 1 and K.occupancy_cap(147, 8, 65536, H) == 128
    assert K.occupancy_cap(186, 8, 65536, H) == 128  # conv forward 128 x 64, 8 warps
    assert K.programs_per_sm(172, 4, 74752, H) == 2 and K.occupancy_cap(172, 4, 74752, H) == 168  # col 64 x 64
    assert K.programs_per_sm(168, 4, 74752, H) == 3
    assert K.occupancy_cap(156, 4, 73728, H) == 0  # row 64 x 64 x 4: 3 programs, shared memory allows 3
    assert K.occupancy_cap(128, 8, 65536, H) == 0  # the next step (80) is below two thirds of 128
    assert K.occupancy_cap(241, 4, 65536, H) == 168  # tried (it spills: 136 B, skipped by the tuner)
    assert K.occupancy_cap(255, 4, 65536, H) == 0  # 168 < 2/3 of 255
    assert K.occupancy_cap(200, 8, 200000, H) == 0  # one program by shared memory anyway
    assert K.occupancy_cap(60, 32, 1024, H) == 0  # 1024 threads: two programs by threads already


def test_sm_limits():
    """The SM limits the tuner derives caps from: none off a GPU; on an H100 / H200 the device's
    own report equals the constants the static checks use (``K.HOPPER``)."""
    assert K.sm_limits(torch.device("cpu")) is None
    if not HAS_CUDA:
        return
    limits = K.sm_limits(torch.device("cuda"))
    assert limits is not None and limits.regs >= 32768 and limits.threads >= 1024
    if torch.cuda.get_device_capability() == (9, 0):
        assert limits == K.HOPPER, limits


def test_tuner_derives_register_capped_candidates(monkeypatch):
    """With the GPU's SM limits (faked), a candidate that registers hold below what its shared
    memory allows gets a capped variant, compiled and timed like the rest: it wins here, and the
    on-disk cache serves it to a later process; a variant whose cap spills is not timed. Without
    limits (CPU), nothing is derived (the other tuner tests)."""
    from types import SimpleNamespace

    heavy, light = K.TileConfig(64, 32, 8, 1), K.TileConfig(16, 16, 4, 1)
    capped_heavy, capped_light = heavy._replace(maxnreg=128), light._replace(maxnreg=96)
    _tuning_on(monkeypatch, (heavy, light))
    monkeypatch.setattr(K, "sm_limits", lambda device: K.HOPPER)
    real_run, launched = K._run, []

    def run(launch, args):  # compiled-kernel facts as a GPU's Triton would report them
        real_run(launch, args)  # the interpreter ignores maxnreg
        cfg = launch.config
        launched.append(cfg)
        regs, smem = (147, 65536) if cfg.block_m == 64 else (100, 16384)
        spills = 8 if cfg == capped_light else 0
        return SimpleNamespace(n_regs=cfg.maxnreg or regs, n_spills=spills, metadata=SimpleNamespace(shared=smem))

    monkeypatch.setattr(K, "_run", run)
    speed, timed = {heavy: 2.0, light: 3.0, capped_heavy: 1.0, capped_light: 0.5}, []

    def bench(fn, warmup, rep):
        fn()
        timed.append(launched[-1])
        return speed[launched[-1]]

    monkeypatch.setattr(K.triton.testing, "do_bench", bench)
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=21)
    out, _ = K.attention_forward(q, k, v, layout, 0.25)
    assert sorted(map(tuple, timed)) == sorted(map(tuple, [heavy, light, capped_heavy]))
    assert list(K._BEST.values()) == [capped_heavy]
    log = {e["config"]: e for e in K.TUNING_LOG}
    assert log[capped_light]["ms"] is None and log[capped_light]["note"].startswith("spills")
    assert log[capped_heavy]["ms"] == 1.0 and log[capped_heavy]["n_regs"] == 128
    ref = reference.sparse_attention(q.double(), k.double(), v.double(), layout, 0.25)
    assert max_err(out, ref) < 1e-5
    K.clear_caches()  # as a new process: the capped choice comes from the on-disk cache, untimed
    timed.clear()
    K.attention_forward(q, k, v, layout, 0.25)
    assert timed == [] and list(K._BEST.values()) == [capped_heavy]


def test_tuning_choice_persists_across_processes(monkeypatch):
    """The tuner's choice goes to the on-disk cache; a process that has only the file (in-memory
    caches cleared) launches it without timing anything; DALLE_FAST_TUNING_CACHE=0 ignores it."""
    from dalle_fast.kernels import tuning_cache

    small, wide, timed = _fake_tuning(monkeypatch, [5.0, 1.0, 1.0, 5.0])
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=15)
    K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 2 and list(K._BEST.values()) == [wide]
    data = json.loads(tuning_cache.cache_file().read_text())
    assert list(data.values()) == [list(wide)]
    K.clear_caches()
    out, _ = K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 2 and list(K._BEST.values()) == [wide] and K.last_forward_tiles(q.dtype, 32) == (64, 32)
    ref = reference.sparse_attention(q.double(), k.double(), v.double(), layout, 0.25)
    assert max_err(out, ref) < 1e-5
    monkeypatch.setenv("DALLE_FAST_TUNING_CACHE", "0")
    K.clear_caches()
    K.attention_forward(q, k, v, layout, 0.25)  # times again; this time small wins
    assert len(timed) == 4 and list(K._BEST.values()) == [small]
    assert list(json.loads(tuning_cache.cache_file().read_text()).values()) == [list(wide)]


def test_corrupt_tuning_cache_is_ignored_and_replaced(monkeypatch):
    from dalle_fast.kernels import tuning_cache

    small, wide, timed = _fake_tuning(monkeypatch, [5.0, 1.0, 5.0, 1.0])
    monkeypatch.setattr(tuning_cache, "_WARNED", set())
    path = tuning_cache.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=16)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 2 and list(json.loads(path.read_text()).values()) == [list(wide)]
    # a stored choice that is not one of the candidates is not used: tuning runs again
    entry = next(iter(json.loads(path.read_text())))
    path.write_text(json.dumps({entry: [128, 128, 8, 3]}))
    K.clear_caches()
    K.attention_forward(q, k, v, layout, 0.25)
    assert len(timed) == 4 and list(json.loads(path.read_text()).values()) == [list(wide)]


def test_precompile_compiles_candidates_concurrently(monkeypatch):
    """The tuner's candidates are compiled at once in a thread pool (Triton's AsyncCompileMode: a
    ``warmup`` under it submits the compile instead of running it), each once, all finished before
    ``_precompile`` returns; a failing compile does not stop the others (its own launch reports it);
    one thread, or no AsyncCompileMode, compiles nothing ahead. The JIT is faked here (no GPU): it
    submits as Triton's ``_do_compile`` does."""
    import threading
    import time

    from triton.runtime import _async_compile

    state = dict(running=0, peak=0, done=[], threads=set())
    lock = threading.Lock()

    class FakeJIT:
        def warmup(self, *args, grid, **meta):
            mode = _async_compile.active_mode.get()
            assert mode is not None, "warmup outside AsyncCompileMode"
            assert args == ("q", "k") and grid == (meta["BLOCK_M"], 2)

            def compile_fn():
                with lock:
                    state["running"] += 1
                    state["peak"] = max(state["peak"], state["running"])
                    state["threads"].add(threading.current_thread().name)
                time.sleep(0.2)
                with lock:
                    state["running"] -= 1
                if meta["BLOCK_M"] == 3:
                    raise RuntimeError("this candidate does not compile")
                state["done"].append(meta["BLOCK_M"])
                return meta["BLOCK_M"]

            return mode.submit(("key", meta["BLOCK_M"]), compile_fn, lambda kernel: None)

    monkeypatch.setitem(K.KERNELS, "fake", FakeJIT())
    launches = [K._Launch("fake", (m, 2), dict(BLOCK_M=m), None) for m in range(1, 7)]
    monkeypatch.setenv("DALLE_FAST_COMPILE_THREADS", "4")
    K._precompile([(launch, ("q", "k")) for launch in launches])
    assert sorted(state["done"]) == [1, 2, 4, 5, 6]  # every candidate but the failing one, each once
    assert state["peak"] >= 2 and len(state["threads"]) >= 2 and state["running"] == 0
    assert all(t.startswith("dalle_fast-compile") for t in state["threads"])
    assert _async_compile.active_mode.get() is None
    state["done"].clear()
    monkeypatch.setenv("DALLE_FAST_COMPILE_THREADS", "1")
    K._precompile([(launch, ("q", "k")) for launch in launches])
    assert state["done"] == []
    monkeypatch.setenv("DALLE_FAST_COMPILE_THREADS", "4")
    import concurrent.futures
    import sys

    with concurrent.futures.ThreadPoolExecutor(1) as pool, _async_compile.AsyncCompileMode(pool):
        K._precompile([(launch, ("q", "k")) for launch in launches])  # another mode is active: left alone
    assert state["done"] == []
    monkeypatch.delattr(triton.runtime, "_async_compile")
    monkeypatch.setitem(sys.modules, "triton.runtime._async_compile", None)  # a Triton without it
    K._precompile([(launch, ("q", "k")) for launch in launches])
    assert state["done"] == []
    monkeypatch.delenv("DALLE_FAST_COMPILE_THREADS")
    assert 1 <= K.compile_threads() <= 16
    for bad in ("zero", "0"):
        monkeypatch.setenv("DALLE_FAST_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="DALLE_FAST_COMPILE_THREADS"):
            K._precompile([(launch, ("q", "k")) for launch in launches])


@pytest.mark.gpu
def test_tuning_compiles_each_candidate_once_ahead(monkeypatch):
    """On a GPU the tuner's concurrent warmups (forward; dQ and dK/dV together) compile exactly the
    kernels its launches then run: Triton's compile hook sees every candidate once, as a warmup,
    and no launch compiles again (a warmup that specialised differently would make the launch
    compile a second kernel); the backward's all come before the first backward timing. The JIT's
    in-memory caches are emptied first (kernels then come from Triton's disk cache and still pass
    the hook)."""
    import collections

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_cache_hook") or not hasattr(K._attn_fwd, "device_caches"):
        pytest.skip("this Triton has no jit_cache_hook / device_caches")
    pytest.importorskip("triton.runtime._async_compile")
    for fn in (K._attn_fwd, K._attn_bwd_dq, K._attn_bwd_dkdv):
        try:
            monkeypatch.setattr(fn, "device_caches", collections.defaultdict(fn.create_binder))
        except (AttributeError, TypeError) as e:
            pytest.skip(f"cannot empty this Triton's JIT cache: {e}")

    monkeypatch.setenv("DALLE_FAST_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("DALLE_FAST_TUNING_CACHE", "0")
    monkeypatch.setenv("DALLE_FAST_COMPILE_THREADS", "8")
    monkeypatch.delenv("DALLE_FAST_TRITON_FLAT", raising=False)
    monkeypatch.setattr(K, "_BEST", {})
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K, "TUNING_LOG", [])
    compiles = []  # (kernel, a warmup?, backward timings logged so far)

    def hook(**kw):
        compiles.append((kw["fn"].name, kw["is_manual_warmup"], sum(e["kernel"] != "fwd" for e in K.TUNING_LOG)))
        return False  # compile as usual

    def kernels_of(name):
        """(candidate kernels, register-capped kernels the tuner derived): the order is a launch
        argument, so one compile serves both orders."""
        base = {c._replace(order=K.ORDER_BH) for c in K._candidates(name) if not c.flat}
        capped = {e["config"]._replace(order=K.ORDER_BH) for e in K.TUNING_LOG if e["kernel"] == name and e["config"].maxnreg}
        return base, capped

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", hook)
    layout = Layout("conv_like", 72, 9, kernel_size=5, dilation=2)
    q, k, v, do = _inputs(1, 2, layout.seq_len, 32, torch.bfloat16, seed=21)
    out, _ = K.attention_forward(q, k, v, layout, 32 ** -0.5)  # the references' default scale
    cands = K._candidates("fwd")
    base, capped = kernels_of("fwd")
    assert [c for c in compiles if c[0] == "_attn_fwd"] == [("_attn_fwd", True, 0)] * (len(base) + len(capped)), compiles
    n_capped = len([e for e in K.TUNING_LOG if e["kernel"] == "fwd" and e["config"].maxnreg])
    assert len([e for e in K.TUNING_LOG if e["kernel"] == "fwd"]) == len(cands) + n_capped
    base_out, _, base_grads = _dense(q, k, v, do, layout, torch.bfloat16)
    ref64, _, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    _assert_close("out", out, ref64, base_out, torch.bfloat16)
    # the backward: dQ's and dK/dV's candidates compiled together, each once, before either is timed
    # (the capped variants each tuning derives come after: they need the candidates' registers)
    out, lse = K.attention_forward(q, k, v, layout, 32 ** -0.5)
    grads = K.attention_backward(do, q, k, v, out, lse, layout, 32 ** -0.5)
    bwd = [c for c in compiles if c[0] in ("_attn_bwd_dq", "_attn_bwd_dkdv")]
    n_base = 0
    for name, fn in (("dq", "_attn_bwd_dq"), ("dkdv", "_attn_bwd_dkdv")):
        base, capped = kernels_of(name)
        n_base += len(base)
        assert [c[:2] for c in bwd if c[0] == fn] == [(fn, True)] * (len(base) + len(capped)), compiles
    assert not any(c[2] for c in bwd[:n_base]), compiles
    assert any(e["kernel"] == "dkdv" for e in K.TUNING_LOG)
    for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _assert_close(name, g, rg, bg, torch.bfloat16)


def test_backward_precompiles_dq_and_dkdv_at_once(monkeypatch):
    """The backward hands dQ's and dK/dV's candidates to one ``_precompile`` call before tuning
    either (the forward its own): on CPU the interpreter has nothing to compile, so the jobs are
    launched here instead, which checks that each carries the arguments its kernel takes; the
    tuned backward matches the reference."""
    defaults = dict(zip(("fwd", "dkdv", "dq"), K.default_configs(32, torch.float32)))
    cands = {name: (c, c._replace(order=K.ORDER_HEAVY)) for name, c in defaults.items()}
    monkeypatch.setattr(K, "_autotune_enabled", lambda dtype: True)
    monkeypatch.setattr(K, "_candidates", lambda name: cands[name])
    monkeypatch.setattr(K, "_BEST", {})
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K, "TUNING_LOG", [])
    monkeypatch.setenv("DALLE_FAST_TUNING_CACHE", "0")
    monkeypatch.setattr(K.triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), 1.0)[1])
    monkeypatch.setattr(K, "_can_precompile", lambda device: True)
    calls = []

    def precompile(jobs):
        kernels = {launch.kernel for launch, _ in jobs}
        # compiled ahead of any timing of these kernels
        assert not [e for e in K.TUNING_LOG if e["kernel"] in kernels], K.TUNING_LOG
        calls.append(sorted({(launch.kernel, launch.config) for launch, _ in jobs}))
        for launch, args in jobs:
            K._run(launch, args)

    monkeypatch.setattr(K, "_precompile", precompile)
    layout = Layout("conv", 20, 6, kernel_size=3)
    q, k, v, do = _inputs(2, 3, 56, 32, torch.float32, seed=23)
    out, lse = K.attention_forward(q, k, v, layout, 32 ** -0.5)
    grads = K.attention_backward(do, q, k, v, out, lse, layout, 32 ** -0.5)
    assert calls == [[("fwd", c) for c in cands["fwd"]], sorted((n, c) for n in ("dkdv", "dq") for c in cands[n])]
    assert sorted(e["kernel"] for e in K.TUNING_LOG) == ["dkdv"] * 2 + ["dq"] * 2 + ["fwd"] * 2
    K.attention_backward(do, q, k, v, out, lse, layout, 32 ** -0.5)  # planned: nothing more
    assert len(calls) == 2
    ref, _, ref_grads = _dense(q, k, v, do, layout, torch.float64)
    base, _, base_grads = _base(q, k, v, do, layout, torch.float32)
    _assert_close("out", out, ref, base, torch.float32)
    for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _assert_close(name, g, rg, bg, torch.float32)


def test_tuner_skips_candidates_ptxas_refuses(monkeypatch):
    """A candidate that ptxas refuses (e.g. under a register cap) is skipped like one that does not
    fit, with a note, as Triton's own autotuner does; it does not fail the call."""
    from triton.runtime.errors import PTXASError

    small, wide, timed = _fake_tuning(monkeypatch, [1.0])
    real_run = K._run

    def run(launch, args):
        if launch.config == wide:
            raise PTXASError("ptxas fatal: register allocation failed")
        return real_run(launch, args)

    monkeypatch.setattr(K, "_run", run)
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=21)
    out, _ = K.attention_forward(q, k, v, layout, 0.25)
    assert list(K._BEST.values()) == [small] and len(timed) == 1
    log = {e["config"]: e for e in K.TUNING_LOG}
    assert log[wide]["ms"] is None and log[wide]["note"].startswith("ptxas failed")
    assert max_err(out, reference.sparse_attention(q.double(), k.double(), v.double(), layout, 0.25)) < 1e-5


def test_tuning_key_holds_mask_parameters_and_gpu_model():
    """Choices are not shared between conv kernel sizes or dilations, nor between GPU models driven
    by one process, and empty problems are neither tuned nor remembered."""
    base = dict(T=256, S=32, KIND=3, KS=11, DIL=1, HEAD_DIM=64)
    cpu = torch.device("cpu")
    keys = {K._tuning_key("fwd", 1280, 8, 16, dict(base, **kw), torch.bfloat16, cpu)
            for kw in ({}, {"KS": 5}, {"DIL": 2})}
    assert len(keys) == 3 and all(key[-1] == K.tuning_cache.device_model(cpu) == "cpu" for key in keys)
    before = dict(K._BEST)
    cfg, final = K._known("fwd", None, 1280, 0, 16, base, torch.bfloat16, cpu)
    assert cfg == K.default_configs(64, torch.bfloat16)[0] and final is False and K._BEST == before


def test_offsets_beyond_int32_are_read_from_a_copy():
    """The kernels form in-head offsets pos * stride(seq) + d in int32: a tensor whose seq stride
    would overflow them (e.g. a seq-first (N, B, H, D) tensor permuted to (B, H, N, D) with a large
    B * H * D) is copied before launching; ordinary strided views are read in place."""
    big = torch.empty_strided((1, 1, 40, 32), (0, 0, 2 ** 26, 1), device="meta")  # 39 * 2**26 >= 2**31
    assert not K._kernel_ready(big) and K._unit_last(big).stride() == (1280, 1280, 32, 1)
    bnhd = torch.empty(2, 1280, 16, 64, device="meta").transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    assert K._kernel_ready(bnhd) and K._unit_last(bnhd) is bnhd


def test_bad_scale_is_refused():
    """The kernels' online softmax relies on scale > 0: the Triton op refuses others, as the C++ op does."""
    layout = Layout("row", 7, 5)
    q, k, v, _ = _inputs(1, 2, layout.seq_len, 32, torch.float32, seed=5)
    for scale in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be positive"):
            torch.ops.dalle_fast.triton_sparse_attention_fwd(q, k, v, *layout.params(), scale)
