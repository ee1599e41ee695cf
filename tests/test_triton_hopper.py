"""The Triton ``hopper`` kernels (segment walk, 128-row tiles, fused backward) and the path choice.

Without a GPU the kernels run under the Triton interpreter on CPU tensors with small tiles
(``hopper_plan.fwd_config``), forced with ``use_triton_path("hopper")``; on an sm_90 GPU the same
tests run the compiled kernels (TMA, warp specialisation). Tolerances as in test_triton_attention.
The static test compiles the forward for sm_90a with the installed Triton (no GPU needed).
"""

import os
import subprocess
import sys

import pytest
import torch

from test_triton_attention import DEVICE, HAS_CUDA, SHAPES, _check_against_reference, _inputs  # noqa: E402 (sets TRITON_INTERPRET)

import dalle_fast  # noqa: E402
from dalle_fast import Layout, reference  # noqa: E402

triton = pytest.importorskip("triton")
from dalle_fast.kernels import hopper_plan as P  # noqa: E402

ON_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
needs_hopper_or_interpreter = pytest.mark.skipif(HAS_CUDA and not ON_HOPPER,
                                                 reason="the hopper kernels need an sm_90 GPU (or the interpreter)")
pytestmark = needs_hopper_or_interpreter
INTERPRET = not HAS_CUDA


@pytest.fixture(params=[False, True], ids=["atomic-dq", "deterministic-dq"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("b,h,t,s,ks,n,d,dtype", SHAPES)
@pytest.mark.parametrize("kind", dalle_fast.KINDS)
def test_matches_reference(kind, b, h, t, s, ks, n, d, dtype, deterministic):
    layout = Layout(kind, t, s, kernel_size=ks)
    with dalle_fast.use_triton_path("hopper"):
        assert dalle_fast.triton_path(torch.empty(b, h, n, d, dtype=dtype, device=DEVICE), layout) == "hopper"
        _check_against_reference(layout, b, h, n, d, dtype)


@pytest.mark.parametrize(
    "layout,b,h,n,d",
    [
        pytest.param(Layout("conv_like", 9, 6, kernel_size=3, dilation=2), 1, 2, 45, 32, id="conv_like-dil2"),
        pytest.param(Layout("conv", 3, 7, kernel_size=5), 1, 1, 52, 32, id="conv-K5-b1-h1"),
        pytest.param(Layout("full", 5, 4, kernel_size=1), 1, 2, 21, 128, id="full-d128"),
        pytest.param(Layout("col", 1, 4), 2, 1, 3, 32, id="col-n3"),
        pytest.param(Layout("row", 40, 9), 1, 1, 121, 32, id="row-several-128-row-tiles"),
    ],
)
def test_more_layouts(layout, b, h, n, d):
    with dalle_fast.use_triton_path("hopper"):
        _check_against_reference(layout, b, h, n, d, torch.float32, seed=1)


def test_lse_output_and_gradient(deterministic):
    """lse is an output of the op and differentiable (d lse / d score = softmax), folded into delta."""
    layout = Layout("col", 7, 5)
    q, k, v, do = _inputs(1, 2, 29, 32, torch.float32, seed=10)
    dlse = torch.randn(1, 2, 29, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with dalle_fast.use_triton_path("hopper"):
        out, lse = torch.ops.dalle_fast.triton_sparse_attention_fwd(*leaves, *layout.params(), 32 ** -0.5)
        grads = torch.autograd.grad([out, lse], leaves, [do, dlse])
    ls = [t.double().requires_grad_() for t in (q, k, v)]
    o, l64 = reference.sparse_attention_lse(*ls, layout, compute_dtype=torch.float64)
    ref = torch.autograd.grad([o, l64], ls, [do.double(), dlse.double()])
    assert (lse.double() - l64).abs().max() < 1e-5
    for got, want in zip(grads, ref):
        assert (got.double() - want).abs().max() < 1e-4


def test_deterministic_dq_is_bit_reproducible():
    layout = Layout("row", 20, 6, kernel_size=3)
    q, k, v, do = _inputs(2, 2, 56, 32, torch.float32, seed=4)
    torch.use_deterministic_algorithms(True)
    try:
        with dalle_fast.use_triton_path("hopper"):
            runs = []
            for _ in range(2):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out = dalle_fast.sparse_attention(*leaves, layout, backend="triton")
                runs.append(torch.autograd.grad(out, leaves, do))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


_NONFINITE_CASES = [pytest.param(Layout(kind, 5, 6, kernel_size=3), path, id=f"{kind}-{path}")
                    for kind in dalle_fast.KINDS for path in ("portable", "hopper")]
# a layout whose tiles do not fit the segment walk: the portable kernels, repaired through the
# superset records
_NONFINITE_CASES.append(pytest.param(Layout("conv_like", 3, 13, kernel_size=4, dilation=3), "portable",
                                     id="conv_like-K4-dil3-portable"))


@pytest.mark.parametrize("layout,path", _NONFINITE_CASES)
def test_masked_nonfinite_keys_and_values_never_reach_a_query(layout, path, deterministic):
    """NaN and inf planted in every key and value a query may not see leave its output, lse and
    dq exactly as on clean inputs (the mask keeps them out of every product: the kernels flag
    non-finite output rows and recompute those tiles with such values zeroed)."""
    n, d = layout.seq_len, 32
    mask = layout.dense_mask(n)
    q, k, v, _ = _inputs(1, 2, n, d, torch.float32, seed=7)
    for i in (n - 1, n - 8, 6):
        hidden = ~mask[i].to(DEVICE)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, hidden] = float("nan")
        v2[:, :, hidden] = float("inf")
        v2[:, :, hidden, ::2] = float("-inf")
        v2[:, :, hidden, ::3] = float("nan")
        do = torch.zeros_like(q)
        do[:, :, i] = 1.0
        results = []
        with dalle_fast.use_triton_path(path):
            for kk, vv in ((k, v), (k2, v2)):
                leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
                out, lse = torch.ops.dalle_fast.triton_sparse_attention_fwd(*leaves, *layout.params(), d ** -0.5)
                dq = torch.autograd.grad(out, leaves[0], do)[0]
                results.append((out[:, :, i], lse[:, :, i], dq[:, :, i]))
        for name, clean, planted in zip(("out", "lse", "dq"), *results):
            assert torch.isfinite(clean).all()
            if path == "portable" and name == "dq":  # recomputed by the repair pass's kernel: its rounding
                assert torch.isfinite(planted).all() and (clean - planted).abs().max() < 1e-5, name
            else:
                assert torch.equal(clean, planted), f"{name} of query {i} changed by values hidden from it"


@pytest.mark.parametrize("path", ["portable", "hopper"])
def test_a_query_that_may_see_a_nonfinite_value_is_not_finite(path):
    layout = Layout("row", 5, 6)
    q, k, v, _ = _inputs(1, 1, layout.seq_len, 32, torch.float32, seed=8)
    v[:, :, 3, 0] = float("nan")  # text key 3: every query from position 3 on may see it
    with dalle_fast.use_triton_path(path):
        out = dalle_fast.sparse_attention(q, k, v, layout, backend="triton")
    assert torch.isfinite(out[:, :, :3]).all()
    assert not torch.isfinite(out[:, :, 3:]).all(-1).any()


# ------------------------------------------------------------------------------------------------
# the plans: segment records, fit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [Layout(k, 256, 32) for k in dalle_fast.KINDS]
                         + [Layout("conv_like", 7, 9, kernel_size=3, dilation=2)], ids=str)
@pytest.mark.parametrize("transpose", [False, True], ids=["query-tiles", "key-tiles"])
def test_segment_records_list_the_tile_table(layout, transpose):
    """Walking a record's runs gives exactly the tile table's row: full tiles, then partial ones."""
    n = layout.seq_len
    for bm, bn in ((128, 64), (64, 128), (32, 16)):
        seg = P.segments(layout, n, bm, bn, transpose)
        if seg is None:
            continue
        tt = layout.tile_table(n, bm, bn)
        row_ptr, col_idx, num_full = ((tt.t_row_ptr, tt.t_col_idx, tt.t_num_full) if transpose
                                      else (tt.row_ptr, tt.col_idx, tt.num_full))
        rec = seg.records.view(-1, 12).tolist()
        assert sorted(seg.order.tolist()) == list(range(len(rec)))
        for i, r in enumerate(rec):
            walked = [s + j for s, length in zip(r[0::2], r[1::2]) for j in range(length)]
            assert walked == col_idx[int(row_ptr[i]):int(row_ptr[i + 1])].tolist()
            assert sum(r[1:6:2]) == int(num_full[i])


def test_work_order_is_heaviest_first():
    seg = P.segments(Layout("row", 256, 32), 1280, 128, 64, False)
    rec = seg.records.view(-1, 12)
    cost = [2 * int(r[1:6:2].sum()) + 3 * int(r[7:12:2].sum()) for r in rec]
    ordered = [cost[i] for i in seg.order.tolist()]
    assert ordered == sorted(ordered, reverse=True)


def test_dilated_layouts_that_do_not_fit_keep_the_portable_kernels():
    layout = Layout("conv_like", 256, 32, kernel_size=5, dilation=2)
    assert P.segments(layout, layout.seq_len, 32, 16, False) is None
    # the repair passes' records cover every layout: one masked run spanning each tile's partners
    tt = layout.tile_table(layout.seq_len, 32, 16)
    rec = P.superset_segments(layout, layout.seq_len, 32, 16, False).records.view(-1, 12)
    for i in range(rec.shape[0]):
        row = tt.col_idx[int(tt.row_ptr[i]):int(tt.row_ptr[i + 1])]
        assert rec[i, :6].tolist() == [0] * 6 and rec[i, 7] >= 1
        assert int(rec[i, 6]) == int(row.min()) and int(rec[i, 6] + rec[i, 7] - 1) == int(row.max())
    q = torch.zeros(1, 1, layout.seq_len, 32, device=DEVICE)
    if INTERPRET:
        with dalle_fast.use_triton_path("hopper"), pytest.raises(ValueError, match="segment walk"):
            dalle_fast.triton_path(q, layout)
        assert dalle_fast.triton_path(q, layout) == "portable"


# ------------------------------------------------------------------------------------------------
# the path choice
# ------------------------------------------------------------------------------------------------
def test_path_choice_and_overrides(monkeypatch):
    layout = Layout("row", 7, 5)
    q = torch.zeros(1, 1, layout.seq_len, 32, dtype=torch.bfloat16, device=DEVICE)
    expected_auto = "hopper" if ON_HOPPER else "portable"
    assert dalle_fast.triton_path(q, layout) == expected_auto
    assert dalle_fast.triton_path(q.float(), layout) == "portable"  # auto: float32 keeps the portable kernels
    with dalle_fast.use_triton_path("portable"):
        assert dalle_fast.triton_path(q, layout) == "portable"
        with dalle_fast.use_triton_path("hopper"):
            assert dalle_fast.triton_path(q, layout) == "hopper"
        assert dalle_fast.triton_path(q, layout) == "portable"
    monkeypatch.setenv("DALLE_FAST_TRITON_PATH", "hopper")
    assert dalle_fast.triton_path(q, layout) == "hopper"
    monkeypatch.setenv("DALLE_FAST_TRITON_PATH", "fastest")
    with pytest.raises(ValueError, match="DALLE_FAST_TRITON_PATH"):
        dalle_fast.triton_path(q, layout)
    with pytest.raises(ValueError, match="name"):
        dalle_fast.set_triton_path("fast")


def test_forcing_hopper_where_it_cannot_serve_says_why():
    from dalle_fast.triton_path import hopper_unavailable

    assert "CUDA device" in hopper_unavailable("meta", torch.bfloat16)
    assert "float16" in hopper_unavailable(DEVICE, torch.float64)
    assert "head_dim" in hopper_unavailable(DEVICE, torch.bfloat16, head_dim=48)


def test_both_paths_agree_through_the_public_op():
    layout = Layout("conv", 20, 6, kernel_size=3)
    q, k, v, do = _inputs(2, 2, 56, 32, torch.float32, seed=5)
    results = []
    for path in ("portable", "hopper"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with dalle_fast.use_triton_path(path):
            out = dalle_fast.sparse_attention(*leaves, layout, backend="triton")
            results.append([out.detach(), *torch.autograd.grad(out, leaves, do)])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------
# static: the forward as compiled for sm_90a with the installed Triton
# ------------------------------------------------------------------------------------------------
_STATIC = r"""
import sys
from dalle_fast.kernels.resources import compile_hopper_forward, resources, warp_specialized
for kind in sys.argv[1:]:
    c = compile_hopper_forward(kind)
    r = resources(c)
    print(kind, c.metadata.num_warps, warp_specialized(c), r["stack"], r["hgmma"], r["regs"])
"""


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernels for real")
def test_forward_compiles_warp_specialized_for_hopper():
    """sm_90a, bf16, D=64, 128 x 64 tiles through TMA: Triton splits the loop into a producer and
    two consumer warpgroups (setmaxnreg in the PTX, 12 warps), the MMAs are warpgroup MMAs, and the
    row and full forwards keep their registers (no stack)."""
    from dalle_fast.kernels.resources import hopper_ws_supported

    why = hopper_ws_supported()
    if why is not None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", _STATIC, "row", "full", "conv"], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip("no ptxas available to this Triton")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()}
    for kind, (warps, ws, stack, hgmma, _) in rows.items():
        assert warps == "12" and ws == "True", f"{kind}: not warp-specialised ({warps} warps)"
        assert int(hgmma) > 0, f"{kind}: no warpgroup MMA"
    for kind in ("row", "full"):
        assert rows[kind][2] == "0", f"{kind} forward spills ({rows[kind][2]} bytes of stack)"
