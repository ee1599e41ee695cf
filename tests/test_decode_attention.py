"""decode_attention: index math, CPU kernel vs the dense reference, shared-text caches, in-place
cache writes, argument errors, opcheck; CUDA kernel vs CPU and CUDA graphs (skipped without a GPU)."""


import pytest
import torch
from hypothesis import given, settings, strategies as st

import dalle_fast
from dalle_fast import Layout, reference

from conftest import assert_close_to_reference

# every test of this module runs once per instruction set of the CPU kernels (conftest.py)
pytestmark = pytest.mark.usefixtures("every_cpu_isa")

LAYOUTS = [
    Layout("full", 7, 5),
    Layout("row", 7, 5),
    Layout("col", 7, 5),
    Layout("conv", 7, 5, kernel_size=3),
    Layout("axial_row", 7, 5),
    Layout("axial_col", 7, 5),
    Layout("conv_like", 7, 5, kernel_size=3, dilation=2),
]
IDS = [l.kind for l in LAYOUTS]


def positions(layout):
    T, S, N = layout.text_len, layout.image_size, layout.seq_len
    # text start/end, first image token, row end, row start, middle, last
    return sorted({0, T - 1, T, T + S - 1, T + S, T + 2 * S + 2, N - 1})


def problem(layout, B, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = layout.seq_len
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    return q, k, v


def caches_for(k, v, pos, n_max=None, offset=0, fill=float("nan")):
    """Caches holding positions < pos[b] (slot p - offset), NaN elsewhere (a read of a wrong slot shows)."""
    B, H, N, D = k.shape
    n_max = n_max or N - offset
    kc = torch.full((B, H, n_max, D), fill, dtype=k.dtype)
    vc = torch.full((B, H, n_max, D), fill, dtype=k.dtype)
    for b, p in enumerate(pos.tolist()):
        kc[b, :, : p - offset] = k[b, :, offset:p]
        vc[b, :, : p - offset] = v[b, :, offset:p]
    return kc, vc


def step_inputs(q, k, v, pos):
    idx = pos.view(-1, 1, 1, 1).expand(q.shape[0], q.shape[1], 1, q.shape[3])
    return q.gather(2, idx), k.gather(2, idx), v.gather(2, idx)


def torch_error(q, k, v, layout, rows, dtype):
    """Max error PyTorch itself reaches at `dtype` against float64 on the selected (b, pos) rows."""
    ref64 = reference.sparse_attention(q.double(), k.double(), v.double(), layout)
    low = reference.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout,
                                     compute_dtype=torch.float32 if dtype == torch.float32 else dtype)
    sel = lambda t: torch.stack([t[b, :, p] for b, p in rows])  # noqa: E731
    return sel(ref64), (sel(low).double() - sel(ref64)).abs().max().item()


def check_rows(out, ref_rows, torch_err):
    """The decoded rows ``out[:, :, 0]`` against the float64 ones: at most twice PyTorch's error ``torch_err``."""
    assert_close_to_reference(out[:, :, 0], ref_rows, torch_err, "decoded rows", floor=1e-6)


# --------------------------------------------------------------------------------- index math
@pytest.mark.parametrize("layout", LAYOUTS + [Layout("conv", 3, 6, kernel_size=5), Layout("conv_like", 2, 6, 2, 1),
                                              Layout("row", 4, 1), Layout("conv", 2, 2, kernel_size=11)], ids=str)
def test_decode_key_positions_match_layout(layout):
    for pos in range(layout.seq_len):
        got = torch.ops.dalle_fast._decode_key_positions(pos, *layout.params())
        assert torch.equal(got, layout.decode_keys(pos)), pos
    assert torch.ops.dalle_fast._max_decode_keys(*layout.params()) == layout.max_decode_keys()


# --------------------------------------------------------------------------------- CPU vs reference
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_cpu_matches_reference_every_position(layout):
    B, H, D = 2, 3, 16
    q, k, v = problem(layout, B, H, D, torch.float32)
    for p in positions(layout):
        pos = torch.tensor([p, max(p - 1, 0)])
        qs, ks, vs = step_inputs(q, k, v, pos)
        kc, vc = caches_for(k, v, pos)
        out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
        assert out.shape == (B, H, 1, D) and out.dtype == torch.float32
        rows = list(enumerate(pos.tolist()))
        ref_rows, terr = torch_error(q, k, v, layout, rows, torch.float32)
        check_rows(out, ref_rows, terr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[3], LAYOUTS[6]], ids=str)
def test_cpu_low_precision(layout, dtype):
    B, H, D = 3, 2, 32
    q, k, v = problem(layout, B, H, D, dtype, seed=1)
    N = layout.seq_len
    pos = torch.tensor([N - 1, layout.text_len, layout.text_len + layout.image_size + 1])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
    assert out.dtype == dtype
    ref_rows, terr = torch_error(q, k, v, layout, list(enumerate(pos.tolist())), dtype)
    check_rows(out, ref_rows, terr)


@pytest.mark.parametrize("D", [64, 128])
def test_cpu_head_dims_mixed_positions(D):
    layout = Layout("row", 16, 8)
    B, H = 5, 2
    q, k, v = problem(layout, B, H, D, torch.float32, seed=2)
    pos = torch.tensor([0, 15, 16, 40, layout.seq_len - 1])  # rows at different positions
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout, scale=0.3)
    ref = reference.sparse_attention(q.double(), k.double(), v.double(), layout, scale=0.3)
    low = reference.sparse_attention(q, k, v, layout, scale=0.3)
    rows = list(enumerate(pos.tolist()))
    sel = lambda t: torch.stack([t[b, :, p] for b, p in rows]).double()  # noqa: E731
    terr = (sel(low) - sel(ref)).abs().max().item()
    check_rows(out, sel(ref), terr)


def test_cache_written_in_place_and_nothing_else():
    layout = LAYOUTS[1]
    B, H, D = 3, 2, 16
    q, k, v = problem(layout, B, H, D, torch.float32, seed=3)
    pos = torch.tensor([3, 9, layout.seq_len - 1])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos, n_max=layout.seq_len + 4, fill=7.0)
    kc0, vc0 = kc.clone(), vc.clone()
    kptr = kc.data_ptr()
    dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
    assert kc.data_ptr() == kptr
    for b, p in enumerate(pos.tolist()):
        assert torch.equal(kc[b, :, p], ks[b, :, 0]) and torch.equal(vc[b, :, p], vs[b, :, 0])
        kc0[b, :, p] = ks[b, :, 0]
        vc0[b, :, p] = vs[b, :, 0]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


def test_scalar_pos_broadcasts_and_strided_cache():
    layout = LAYOUTS[3]
    B, H, D = 2, 2, 16
    q, k, v = problem(layout, B, H, D, torch.float32, seed=4)
    p = layout.text_len + 7
    pos = torch.tensor(p)
    qs, ks, vs = step_inputs(q, k, v, pos.expand(B))
    big_k, big_v = caches_for(k, v, pos.expand(B), n_max=layout.seq_len + 3)
    kc, vc = big_k[:, :, : layout.seq_len], big_v[:, :, : layout.seq_len]  # non-contiguous views
    out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
    assert torch.equal(big_k[:, :, p], ks[:, :, 0])
    ref_rows, terr = torch_error(q, k, v, layout, [(0, p), (1, p)], torch.float32)
    check_rows(out, ref_rows, terr)


def test_reference_backend_matches_cpu():
    layout = LAYOUTS[0]
    q, k, v = problem(layout, 2, 2, 16, torch.float32, seed=5)
    pos = torch.tensor([5, layout.seq_len - 2])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    kc2, vc2 = kc.clone(), vc.clone()
    a = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout, backend="reference")
    b = dalle_fast.decode_attention(qs, ks, vs, kc2, vc2, pos, layout, backend="cpu")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------- shared text
def shared_problem(layout, prompt_index, H, D, dtype, pos, seed=6):
    """Rows of one prompt share text keys/values; returns the plain and the shared cache sets."""
    P = int(prompt_index.max()) + 1
    B, T = prompt_index.numel(), layout.text_len
    q, k, v = problem(layout, B, H, D, dtype, seed)
    gt = torch.Generator().manual_seed(seed + 1)
    tk = torch.randn(P, H, T, D, generator=gt).to(dtype)
    tv = torch.randn(P, H, T, D, generator=gt).to(dtype)
    k[:, :, :T] = tk[prompt_index]
    v[:, :, :T] = tv[prompt_index]
    return q, k, v, tk, tv


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_shared_text_equals_unshared(layout):
    prompt_index = torch.tensor([1, 0, 1, 0, 0, 1])
    H, D = 2, 16
    T = layout.text_len
    pos = torch.tensor([T, T + 1, T + layout.image_size, layout.seq_len - 1, T + 3, layout.seq_len - 2])
    q, k, v, tk, tv = shared_problem(layout, prompt_index, H, D, torch.float32, pos)
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    ik, iv = caches_for(k, v, pos, offset=T)  # image-only per-row caches
    tk_pad = torch.cat([tk, torch.full_like(tk[:, :, :2], float("nan"))], 2)  # text caches may be longer
    tv_pad = torch.cat([tv, torch.full_like(tv[:, :, :2], float("nan"))], 2)
    plain = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
    shared = dalle_fast.decode_attention(qs, ks, vs, ik, iv, pos, layout, text_k_cache=tk_pad,
                                         text_v_cache=tv_pad, prompt_index=prompt_index)
    # the shared path computes the text part of a prompt's rows as GEMMs (another summation order):
    # both paths against float64 with the rule of the other decode tests
    ref_rows, terr = torch_error(q, k, v, layout, list(enumerate(pos.tolist())), torch.float32)
    check_rows(plain, ref_rows, terr)
    check_rows(shared, ref_rows, terr)
    for b, p in enumerate(pos.tolist()):
        assert torch.equal(ik[b, :, p - T], ks[b, :, 0])
    refd = dalle_fast.decode_attention(qs, ks, vs, ik.clone(), iv.clone(), pos, layout, text_k_cache=tk,
                                       text_v_cache=tv, prompt_index=prompt_index, backend="reference")
    torch.testing.assert_close(refd, shared, rtol=1e-5, atol=1e-6)


def test_shared_text_rejects_text_positions():
    layout = LAYOUTS[1]
    T, H, D = layout.text_len, 2, 16
    z = torch.zeros(2, H, 1, D)
    ic = torch.zeros(2, H, layout.image_size ** 2, D)
    tc = torch.zeros(1, H, T, D)
    with pytest.raises(ValueError, match="pos"):
        dalle_fast.decode_attention(z, z, z, ic, ic.clone(), torch.tensor([T - 1, T]), layout, text_k_cache=tc,
                                    text_v_cache=tc, prompt_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prompt_index"):
        dalle_fast.decode_attention(z, z, z, ic, ic.clone(), torch.tensor([T, T]), layout, text_k_cache=tc,
                                    text_v_cache=tc, prompt_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="together"):
        dalle_fast.decode_attention(z, z, z, ic, ic.clone(), torch.tensor([T, T]), layout, text_k_cache=tc)


# --------------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(dalle_fast.KINDS), T=st.integers(1, 9), S=st.integers(1, 6), K=st.integers(1, 4),
       d=st.integers(1, 3), data=st.data())
def test_property_decode_equals_last_row(kind, T, S, K, d, data):
    if kind == "conv":
        K = 2 * K - 1
    layout = Layout(kind, T, S, kernel_size=K, dilation=d if kind == "conv_like" else 1)
    p = data.draw(st.integers(0, layout.seq_len - 1))
    q, k, v = problem(layout, 1, 2, 8, torch.float32, seed=p)
    pos = torch.tensor([p])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
    ref_rows, terr = torch_error(q, k, v, layout, [(0, p)], torch.float32)
    check_rows(out, ref_rows, terr)


# --------------------------------------------------------------------------------- errors, opcheck
def test_bad_inputs_raise():
    layout = LAYOUTS[1]
    N = layout.seq_len
    q = torch.zeros(2, 2, 1, 16)
    kc = torch.zeros(2, 2, N, 16)

    def call(**kw):
        args = dict(q=q, k_new=q, v_new=q, k_cache=kc, v_cache=kc.clone(), pos=torch.tensor([0, 1]), layout=layout)
        args.update(kw)
        return dalle_fast.decode_attention(**args)

    with pytest.raises(ValueError, match="pos"):
        call(pos=torch.tensor([0, N]))
    with pytest.raises(ValueError, match="pos"):
        call(pos=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="pos must be int64"):
        call(pos=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="pos must be 0-dim"):
        call(pos=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="too short"):
        call(k_cache=kc[:, :, :5], v_cache=kc[:, :, :5], pos=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="k_new"):
        call(k_new=torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match="v_cache"):
        call(v_cache=kc.double())
    with pytest.raises(ValueError, match="k_cache"):
        call(k_cache=torch.zeros(2, 3, N, 16))
    with pytest.raises(ValueError, match="q must be"):
        call(q=torch.zeros(2, 2, 2, 16))
    with pytest.raises(ValueError, match="layout"):
        call(layout="row")
    with pytest.raises(ValueError, match="triton"):
        call(backend="triton")
    with pytest.raises(ValueError, match="cuda"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        call(q=q.double(), k_new=q.double(), v_new=q.double(), k_cache=kc.double(), v_cache=kc.double())
    # the C++ op checks on its own too
    with pytest.raises(ValueError, match="pos"):
        torch.ops.dalle_fast.decode_attention(q, q, q, kc, kc.clone(), torch.tensor([0, N]), None, None, None,
                                              *layout.params(), 0.25)


@pytest.mark.parametrize("shared", [False, True])
def test_opcheck(shared):
    layout = LAYOUTS[3]
    B, H, D, T = 2, 2, 16, layout.text_len
    q = torch.randn(B, H, 1, D)
    if shared:
        kc = torch.randn(B, H, layout.image_size ** 2, D)
        extra = (torch.randn(1, H, T, D), torch.randn(1, H, T, D), torch.tensor([0, 0]))
        pos = torch.tensor([T + 3, T + 10])
    else:
        kc = torch.randn(B, H, layout.seq_len, D)
        extra = (None, None, None)
        pos = torch.tensor([2, T + 10])
    args = (q, torch.randn_like(q), torch.randn_like(q), kc, torch.randn_like(kc), pos, *extra, *layout.params(), 0.25)
    torch.library.opcheck(torch.ops.dalle_fast.decode_attention.default, args)


def test_torch_compile_mutates_cache():
    layout = LAYOUTS[1]
    q, k, v = problem(layout, 2, 2, 16, torch.float32, seed=8)
    pos = torch.tensor([4, 20])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    kc2, vc2 = kc.clone(), vc.clone()
    f = torch.compile(lambda *a: dalle_fast.decode_attention(*a, layout), backend="aot_eager", fullgraph=True)
    out = f(qs, ks, vs, kc, vc, pos)
    ref = dalle_fast.decode_attention(qs, ks, vs, kc2, vc2, pos, layout)
    assert torch.equal(out, ref)
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc2, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(kc[:, :, 4:5][0], ks[0])


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("layout", LAYOUTS + [Layout("row", 256, 32), Layout("conv", 256, 32, kernel_size=11)],
                         ids=str)
def test_cuda_matches_cpu(layout, D, dtype):
    B, H = 3, 2
    q, k, v = problem(layout, B, H, D, dtype, seed=9)
    N, T = layout.seq_len, layout.text_len
    pos = torch.tensor([N - 1, T, max(T - 1, 0)])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    out_cpu = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout)
    kg, vg = kc.cuda(), vc.cuda()
    out = dalle_fast.decode_attention(qs.cuda(), ks.cuda(), vs.cuda(), kg, vg, pos.cuda(), layout)
    ref_rows, terr = torch_error(q, k, v, layout, list(enumerate(pos.tolist())), dtype)
    check_rows(out.cpu(), ref_rows, terr)
    torch.testing.assert_close(out.cpu().float(), out_cpu.float(), rtol=2 * terr + 1e-5, atol=2 * terr + 1e-5)
    for b, p in enumerate(pos.tolist()):
        assert torch.equal(kg[b, :, p].cpu(), ks[b, :, 0]) and torch.equal(vg[b, :, p].cpu(), vs[b, :, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8, 64])
def test_cuda_split_k_many_rows_and_shared_text(B):
    layout = Layout("full", 64, 16)
    H, D, T = 4, 64, layout.text_len
    prompt_index = torch.arange(B) // 4
    pos = torch.randint(T, layout.seq_len, (B,), generator=torch.Generator().manual_seed(B))
    q, k, v, tk, tv = shared_problem(layout, prompt_index, H, D, torch.bfloat16, pos, seed=10)
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    ik, iv = caches_for(k, v, pos, offset=T)
    c = lambda t: t.cuda()  # noqa: E731
    plain = dalle_fast.decode_attention(c(qs), c(ks), c(vs), c(kc), c(vc), c(pos), layout)
    shared = dalle_fast.decode_attention(c(qs), c(ks), c(vs), c(ik), c(iv), c(pos), layout, text_k_cache=c(tk),
                                         text_v_cache=c(tv), prompt_index=c(prompt_index))
    assert torch.equal(plain, shared)
    ref_rows, terr = torch_error(q, k, v, layout, list(enumerate(pos.tolist())), torch.bfloat16)
    check_rows(plain.cpu(), ref_rows, terr)


@pytest.mark.gpu
def test_cuda_split_plan_per_query():
    """Each query spreads its own key list over the launch's splits (decode_split): one launch with a
    row at every 3rd position of a 260-key `full` layout (1 to 260 keys, most rows using fewer splits
    than the launch has), and single rows (the most splits) of a 1028-key one at list lengths around
    the 64-key share."""
    short, long = Layout("full", 4, 16), Layout("full", 4, 32)
    H, D = 2, 32
    cases = [(short, list(range(0, short.seq_len, 3)) + [short.seq_len - 1])]
    cases += [(long, [p]) for p in (0, 3, 62, 63, 64, 127, 128, 129, 700, long.seq_len - 1)]
    for layout, pos_list in cases:
        pos = torch.tensor(pos_list)
        q, k, v = problem(layout, len(pos_list), H, D, torch.float32, seed=12 + len(pos_list))
        qs, ks, vs = step_inputs(q, k, v, pos)
        kc, vc = caches_for(k, v, pos)
        out = dalle_fast.decode_attention(qs.cuda(), ks.cuda(), vs.cuda(), kc.cuda(), vc.cuda(), pos.cuda(), layout)
        ref_rows, terr = torch_error(q, k, v, layout, list(enumerate(pos_list)), torch.float32)
        check_rows(out.cpu(), ref_rows, terr)


@pytest.mark.gpu
def test_cuda_bad_pos_gives_nan_without_sync():
    layout = Layout("row", 8, 4)
    q = torch.randn(2, 2, 1, 32, device="cuda")
    kc = torch.zeros(2, 2, layout.seq_len, 32, device="cuda")
    out = dalle_fast.decode_attention(q, q, q, kc, kc.clone(), torch.tensor([3, 10_000], device="cuda"), layout)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert (kc[1] == 0).all()


@pytest.mark.gpu
def test_cuda_graph_decode_and_sample():
    layout = Layout("row", 8, 6)
    B, H, D, V = 4, 2, 32, 64
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(H * D, V, device=dev, generator=g) * 0.1
    kc = torch.zeros(B, H, layout.seq_len, D, device=dev)
    vc = torch.zeros_like(kc)
    q = torch.randn(B, H, 1, D, device=dev, generator=g)
    kn, vn = torch.randn_like(q), torch.randn_like(q)
    pos = torch.full((B,), layout.text_len, dtype=torch.long, device=dev)
    step = torch.zeros((), dtype=torch.long, device=dev)
    seeds = torch.arange(B, device=dev) * 7 + 1
    tokens = torch.zeros(B, dtype=torch.long, device=dev)

    def body():
        out = dalle_fast.decode_attention(q, kn, vn, kc, vc, pos, layout)
        logits = out.reshape(B, -1) @ W
        tokens.copy_(dalle_fast.sample(logits, seeds=seeds, step=step, top_k=20, top_p=0.95))
        pos.add_(1)
        step.add_(1)

    def reset():
        kc.zero_(), vc.zero_(), pos.fill_(layout.text_len), step.zero_()

    def run(n, fn):
        reset()
        seq = []
        for _ in range(n):
            fn()
            seq.append(tokens.clone())
        return torch.stack(seq)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(s)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    eager = run(10, body)
    replay1 = run(10, graph.replay)
    replay2 = run(10, graph.replay)
    assert torch.equal(replay1, replay2)  # deterministic replays
    assert torch.equal(replay1, eager)    # same as eager
    assert len({tuple(r.tolist()) for r in replay1}) > 1  # step advanced on device: fresh draws
    assert int(pos[0]) == layout.text_len + 10


def test_bad_inputs_raise_strided_pos_shared_memory_and_scale():
    """pos is checked and read as the same (contiguous) values, whatever its strides: a strided pos
    is range-checked on the memory the kernel reads (else an out-of-range slot could be written
    under torch.compile, where only the C++ check runs). Caches that share memory, which the
    in-place write would corrupt, and a bad scale are refused."""
    layout = LAYOUTS[1]
    q, k, v = problem(layout, 2, 2, 16, torch.float32)
    pos = torch.tensor([3, 9])
    kc, vc = caches_for(k, v, pos)
    qs, ks, vs = step_inputs(q, k, v, pos)
    want = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout)
    for strided in (torch.tensor([3, 0, 9, 0])[::2], torch.tensor([[3, 0], [9, 0]])[:, 0]):
        assert strided.stride() != (1,)
        got = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), strided, layout)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got = torch.ops.dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), strided, None, None, None,
                                                    *layout.params(), 0.25)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    nine = torch.tensor([9, 9])
    kc9, vc9 = caches_for(k, v, nine)
    q9, k9, v9 = step_inputs(q, k, v, nine)
    ref = dalle_fast.decode_attention(q9, k9, v9, kc9.clone(), vc9.clone(), nine, layout)
    expanded = torch.tensor(9).expand(2)  # stride 0
    got = dalle_fast.decode_attention(q9, k9, v9, kc9.clone(), vc9.clone(), expanded, layout)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    cache = kc.clone()
    with pytest.raises(ValueError, match=r"pos\[1\] = 5000"):  # the value at the strided slot, not its neighbour
        torch.ops.dalle_fast.decode_attention(qs, ks, vs, cache, vc.clone(), torch.tensor([3, 0, 5000, 0])[::2],
                                              None, None, None, *layout.params(), 0.25)
    torch.testing.assert_close(cache, kc, rtol=0, atol=0, equal_nan=True)  # refused before any write
    one = kc[:1].expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="k_cache is written in place"):
        dalle_fast.decode_attention(qs, ks, vs, one, vc.clone(), pos, layout)
    with pytest.raises(ValueError, match="k_cache is written in place"):
        dalle_fast.decode_attention(qs, ks, vs, one, vc.clone(), pos, layout, backend="reference")
    with pytest.raises(ValueError, match="k_cache is written in place"):
        torch.ops.dalle_fast.decode_attention(qs, ks, vs, one, vc.clone(), pos, None, None, None,
                                              *layout.params(), 0.25)
    shared = kc.clone()
    with pytest.raises(ValueError, match="must not share memory"):
        torch.ops.dalle_fast.decode_attention(qs, ks, vs, shared, shared, pos, None, None, None,
                                              *layout.params(), 0.25)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout, scale=scale)
        with pytest.raises(ValueError, match="scale"):
            torch.ops.dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, None, None, None,
                                                  *layout.params(), scale)


def test_empty_batch_and_inference_only():
    layout = LAYOUTS[1]
    q = torch.zeros(0, 2, 1, 16)
    kc = torch.zeros(0, 2, layout.seq_len, 16)
    for backend in ("cpu", "reference"):
        out = dalle_fast.decode_attention(q, q, q, kc, kc.clone(), torch.zeros(0, dtype=torch.long), layout,
                                          backend=backend)
        assert out.shape == (0, 2, 1, 16)
    q, k, v = problem(layout, 1, 2, 16, torch.float32)
    pos = torch.tensor([5])
    kc, vc = caches_for(k, v, pos)
    qs, ks, vs = step_inputs(q, k, v, pos)
    qs.requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):  # the kernel has no backward: no silent None grad
        dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout)
    with torch.no_grad():
        dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout)
    out = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout, backend="reference")
    out.sum().backward()
    assert qs.grad is not None


def test_nan_key_propagates_like_the_reference():
    layout = LAYOUTS[1]
    q, k, v = problem(layout, 2, 2, 16, torch.float32)
    k[0, 1, 2, 3] = float("nan")  # a text key every position attends
    pos = torch.tensor([20, 20])
    kc, vc = caches_for(k, v, pos, fill=0.0)
    qs, ks, vs = step_inputs(q, k, v, pos)
    ours = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout)
    ref = dalle_fast.decode_attention(qs, ks, vs, kc.clone(), vc.clone(), pos, layout, backend="reference")
    assert torch.equal(ours.isnan(), ref.isnan()) and ours[0, 1].isnan().all() and not ours[1].isnan().any()


@pytest.mark.gpu
def test_cuda_misaligned_and_strided_step_inputs():
    """q, k_new, v_new at an odd storage offset (read with 16-byte vector loads) are copied, not a
    misaligned-address fault; a strided pos is read as its values."""
    layout = LAYOUTS[1]
    q, k, v = problem(layout, 2, 2, 64, torch.float16, seed=4)
    pos = torch.tensor([5, 11])
    qs, ks, vs = step_inputs(q, k, v, pos)
    kc, vc = caches_for(k, v, pos)
    want = dalle_fast.decode_attention(qs.cuda(), ks.cuda(), vs.cuda(), kc.cuda(), vc.cuda(), pos.cuda(), layout)

    def odd(t):  # the same values, one element past an aligned allocation
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = buf[1:].view(t.shape)
        view.copy_(t.cuda())
        return view

    strided = torch.tensor([5, 0, 11, 0], device="cuda")[::2]
    got = dalle_fast.decode_attention(odd(qs), odd(ks), odd(vs), kc.cuda(), vc.cuda(), strided, layout)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_more_than_65535_heads_is_a_clear_error():
    # the heads are gridDim.z of the launch (at most 65535): 65536 heads failed inside CUDA with an
    # invalid launch configuration; now a clear error naming the heads (the cpu backend serves them)
    layout = Layout("row", 2, 2)
    N, D = layout.seq_len, 32
    for H, ok in ((65535, True), (65536, False)):
        q, k, v = (torch.randn(1, H, N, D, dtype=torch.float16, device="cuda") for _ in range(3))
        pos = torch.tensor([N - 1], device="cuda")
        qs, ks, vs = step_inputs(q, k, v, pos)
        kc, vc = (c.cuda() for c in caches_for(k, v, pos, fill=0.0))  # (caches_for builds on the CPU)
        if ok:
            out = dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
            assert out.shape == (1, H, 1, D) and torch.isfinite(out).all()
        else:
            with pytest.raises(ValueError, match="at most 65535 heads"):
                dalle_fast.decode_attention(qs, ks, vs, kc, vc, pos, layout)
