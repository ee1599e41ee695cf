"""Non-finite values where a query may not look. Keys and values outside a query's mask never
influence its output, lse or gradients, whatever they hold (NaN, +inf, -inf); a row that reads a
non-finite query, key or value outputs NaN (lse NaN) and passes no gradient. Every kind, awkward
shapes, the cpu and reference backends, prefill and decode."""
import math

import pytest
import torch

import dalle_fast
from dalle_fast import KINDS, Layout, reference

from conftest import kernel_isas

NONFINITE = torch.tensor([float("nan"), float("inf"), float("-inf")])
# (T, S, N or None, D): partial tiles, a partial last image row, text longer than a tile, odd D
SHAPES = [(7, 6, None, 24), (3, 9, 70, 5), (33, 8, 90, 64), (1, 12, 120, 16)]
DTYPES = {"cpu": torch.float32, "reference": torch.float64}
TOL = {"cpu": 2e-5, "reference": 1e-12}


@pytest.fixture(params=[("cpu", isa) for isa in kernel_isas()] + [("reference", None)],
                ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def backend(request):
    """A backend name; the cpu backend once per instruction set of its kernels (conftest.py)."""
    name, isa = request.param
    if isa is None:
        yield name
    else:
        with dalle_fast.use_cpu_isa(isa):
            yield name


def layout_for(kind, T, S):
    if kind == "conv_like":
        return Layout(kind, T, S, kernel_size=3, dilation=2)
    return Layout(kind, T, S, kernel_size=3 if kind == "conv" else 11)


def attention_lse(backend, q, k, v, layout):
    """(out, lse) of ``backend``, differentiable in both."""
    if backend == "reference":
        return reference.sparse_attention_lse(q, k, v, layout)
    if backend == "cpu":
        return torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), 1 / math.sqrt(q.shape[-1]))
    raise AssertionError(backend)


def queries_under_test(layout, n):
    """The last text query, a middle image query (not in column 0) and the last one."""
    T, S = layout.text_len, layout.image_size
    return sorted({min(T - 1, n - 1), min(T + (n - T) // 2 + S // 2, n - 1), n - 1})


def plant(t, where, gen):
    """A copy of ``t`` (B, H, N, D) whose entries at the positions ``where`` (N,) hold NaN, +inf or -inf."""
    t = t.clone()
    idx = torch.randint(len(NONFINITE), t[:, :, where].shape, generator=gen)
    t[:, :, where] = NONFINITE[idx].to(t.dtype)
    return t


@pytest.mark.parametrize("T,S,N,D", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_out_nonfinite_keys_and_values_never_reach_a_query(kind, T, S, N, D, backend):
    layout = layout_for(kind, T, S)
    n = N or layout.seq_len
    gen = torch.Generator().manual_seed(n * D)
    q64, k64, v64 = (torch.randn(1, 2, n, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g_out = torch.randn(1, 2, n, D, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(1, 2, n, generator=gen, dtype=torch.float64)
    mask = layout.dense_mask(n)
    dtype = DTYPES[backend]
    for q0 in queries_under_test(layout, n):
        hidden = ~mask[q0]  # every key this query may not read: planted with non-finite values
        if not hidden.any():
            continue
        reads_poison = mask[:, hidden].any(1)  # rows that may read a planted key: they output NaN
        assert not reads_poison[q0]
        # the clean float64 reference, with no gradient from the rows that read a planted key
        q, k, v = (t.clone().requires_grad_() for t in (q64, k64, v64))
        ref_out, ref_lse = reference.sparse_attention_lse(q, k, v, layout)
        keep = (~reads_poison).double()
        ref_loss = (ref_out * g_out * keep[:, None]).sum() + (ref_lse * g_lse * keep).sum()
        ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
        # the backend on the planted inputs, gradients from every row
        q, k, v = (x.to(dtype).requires_grad_() for x in (q64, plant(k64, hidden, gen), plant(v64, hidden, gen)))
        out, lse = attention_lse(backend, q, k, v, layout)
        clean = ~reads_poison
        what = f"{layout} n={n} D={D} query {q0}"
        assert torch.isfinite(out[:, :, clean]).all() and torch.isfinite(lse[:, :, clean]).all(), what
        torch.testing.assert_close(out[:, :, clean].double(), ref_out[:, :, clean].detach(), atol=TOL[backend],
                                   rtol=0, msg=what)
        torch.testing.assert_close(lse[:, :, clean].double(), ref_lse[:, :, clean].detach(), atol=TOL[backend],
                                   rtol=0, msg=what)
        assert torch.isnan(out[:, :, reads_poison]).all() and torch.isnan(lse[:, :, reads_poison]).all(), what
        loss = (out * g_out.to(dtype)).sum() + (lse * g_lse.to(dtype)).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
        for name, ours, ref in zip("qkv", grads, ref_grads):
            assert torch.isfinite(ours).all(), f"{what}: d{name} not finite"
            torch.testing.assert_close(ours.double(), ref, atol=10 * TOL[backend], rtol=0, msg=f"{what}: d{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_reading_a_nonfinite_value_is_nan_and_others_are_untouched(kind, backend):
    """Where a query's own allowed key, value or the query itself holds NaN, +inf or -inf (-inf in a
    key can give a -inf score, which a softmax would silently drop), that row is NaN."""
    layout = layout_for(kind, 5, 6)
    n = layout.seq_len
    mask = layout.dense_mask(n)
    gen = torch.Generator().manual_seed(1)
    dtype = DTYPES[backend]
    for which in ("q", "k", "v"):
        for value in NONFINITE.tolist():
            q, k, v = (torch.randn(1, 1, n, 8, generator=gen, dtype=dtype) for _ in range(3))
            clean_out, _ = attention_lse(backend, q, k, v, layout)
            p = n - 3
            {"q": q, "k": k, "v": v}[which][0, 0, p, 0] = value
            if which == "k":  # a -inf score: positive query entry times -inf
                q[0, 0, :, 0] = q[0, 0, :, 0].abs() + 0.1
                clean_out, _ = attention_lse(backend, q, k.nan_to_num(0.0, 0.0, 0.0), v, layout)
            out, lse = attention_lse(backend, q, k, v, layout)
            reads = torch.zeros(n, dtype=torch.bool)
            if which == "q":
                reads[p] = True
            else:
                reads = mask[:, p].clone()
            what = f"{layout}: {value} in {which} at {p}"
            assert torch.isnan(out[0, 0, reads]).all() and torch.isnan(lse[0, 0, reads]).all(), what
            torch.testing.assert_close(out[0, 0, ~reads], clean_out[0, 0, ~reads], atol=1e-6, rtol=0, msg=what)


def caches(k, v, pos, length):
    """Caches (B, H, length, D) holding positions <= pos[b] of k, v; the other slots hold
    non-finite values (uninitialised memory)."""
    B, H, _, D = k.shape
    gen = torch.Generator().manual_seed(7)
    kc = NONFINITE[torch.randint(3, (B, H, length, D), generator=gen)].to(k.dtype)
    vc = NONFINITE[torch.randint(3, (B, H, length, D), generator=gen)].to(k.dtype)
    for b, p in enumerate(pos.tolist()):
        kc[b, :, :p + 1] = k[b, :, :p + 1]
        vc[b, :, :p + 1] = v[b, :, :p + 1]
    return kc, vc


@pytest.mark.parametrize("kind", KINDS)
def test_decode_ignores_unread_slots_and_agrees_with_prefill(kind, backend):
    """A decode step reads only its allowed keys: non-finite values in every other slot (masked
    positions before it, uninitialised ones after it) change nothing; an allowed non-finite key
    or value makes the row NaN, as in prefill."""
    layout = layout_for(kind, 5, 6)
    n, D = layout.seq_len, 16
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32
    q, k, v = (torch.randn(3, 2, n, D, generator=gen, dtype=dtype) for _ in range(3))
    pos = torch.tensor([n - 1, n - 8, layout.text_len + 1])
    mask = layout.dense_mask(n)
    for b, p in enumerate(pos.tolist()):  # every slot before pos that pos may not read: non-finite
        hidden = ~mask[p, :p]
        k[b, :, :p][:, hidden] = float("nan")
        v[b, :, :p][:, hidden] = float("-inf")
    idx = pos.view(-1, 1, 1, 1).expand(3, 2, 1, D)
    step = [t.gather(2, idx) for t in (q, k, v)]
    kc, vc = caches(k, v, pos - 1, n + 3)
    with torch.no_grad():
        out = dalle_fast.decode_attention(*step, kc, vc, pos, layout, backend=backend)
        ref = reference.sparse_attention(q.double(), k.nan_to_num(0.0, 0.0, 0.0).double(),
                                         v.nan_to_num(0.0, 0.0, 0.0).double(), layout)
        prefill = dalle_fast.sparse_attention(q, k, v, layout, backend="cpu" if backend == "cpu" else "reference")
    for b, p in enumerate(pos.tolist()):
        assert torch.isfinite(out[b]).all(), (layout, p)
        torch.testing.assert_close(out[b, :, 0].double(), ref[b, :, p], atol=2e-5, rtol=0)
        torch.testing.assert_close(out[b, :, 0], prefill[b, :, p], atol=2e-5, rtol=0)
    # an allowed key holding -inf (a -inf score) or an allowed value holding +inf: NaN rows
    p = int(pos[0])
    for t, value in ((k, float("-inf")), (v, float("inf"))):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[0, :, p] = q2[0, :, p].abs() + 0.1
        (k2 if t is k else v2)[0, :, layout.text_len - 1] = value  # a text key: every image query reads it
        step = [x.gather(2, idx) for x in (q2, k2, v2)]
        kc, vc = caches(k2, v2, pos - 1, n + 3)
        with torch.no_grad():
            out = dalle_fast.decode_attention(*step, kc, vc, pos, layout, backend=backend)
            prefill = dalle_fast.sparse_attention(q2, k2, v2, layout,
                                                  backend="cpu" if backend == "cpu" else "reference")
        assert torch.isnan(out[0]).all() and torch.isnan(prefill[0, :, p]).all(), (layout, value)
