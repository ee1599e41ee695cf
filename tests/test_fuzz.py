"""Hypothesis fuzz of the public ops with non-finite and extreme values: Layout, sparse_attention
(forward and backward), decode_attention and sample, on the cpu and reference backends. Properties
that hold whatever the magnitudes: no crash but clear errors; a row that reads a non-finite query,
key or value is NaN and passes no gradient; every other row is exactly what it is when the values it
may not read are replaced by zeros; the cpu and reference backends agree on which rows are NaN."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dalle_fast
from dalle_fast import KINDS, Layout, reference
from dalle_fast.masks import MAX_SEQ_LEN

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3.0e38, -3.0e38, 1e-40, 1e30, -1e30]
MAGNITUDES = [1e-30, 1e-3, 1.0, 30.0, 1e15]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def layouts(max_t=40, max_s=9):
    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(KINDS))
        T, S = draw(st.integers(1, max_t)), draw(st.integers(1, max_s))
        if kind == "conv":
            return Layout(kind, T, S, kernel_size=draw(st.sampled_from([1, 3, 5])))
        if kind == "conv_like":
            return Layout(kind, T, S, kernel_size=draw(st.integers(1, 4)), dilation=draw(st.integers(1, 3)))
        return Layout(kind, T, S)
    return build()


@st.composite
def tensors(draw, shape):
    """A float32 tensor of ``shape``: random values at one magnitude, some entries special values."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * draw(st.sampled_from(MAGNITUDES))
    n_special = draw(st.integers(0, 4))
    flat = t.view(-1)
    for _ in range(n_special):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    return t


def nan_rows(q, k, v, mask):
    """(B, H, N) bool: rows that read a non-finite query, key or value (the ops' semantics)."""
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    return ~torch.isfinite(q).all(-1) | (mask & bad_kv.unsqueeze(-2)).any(-1)


def zero_nonfinite(t):
    return torch.where(torch.isfinite(t), t, torch.zeros(()))


# ------------------------------------------------------------------------------------------ Layout
@FUZZ
@given(kind=st.one_of(st.sampled_from(KINDS), st.text(max_size=5)),
       ints=st.lists(st.one_of(st.integers(-5, 2**64), st.sampled_from([True, 1.5, None, 2**31 - 1, 46341])),
                     min_size=4, max_size=4))
def test_layout_is_valid_or_a_value_error(kind, ints):
    T, S, K, d = ints
    try:
        layout = Layout(kind, T, S, kernel_size=K, dilation=d)
    except ValueError:
        return
    assert 1 <= layout.seq_len <= MAX_SEQ_LEN
    keys = torch.ops.dalle_fast._max_decode_keys(*layout.params())  # the C++ side takes it as is
    assert 1 <= keys <= layout.seq_len


# ------------------------------------------------------------------------------------------ sparse_attention
@FUZZ
@given(data=st.data(), layout=layouts(), D=st.integers(1, 24), backend=st.sampled_from(["cpu", "reference"]),
       scale=st.sampled_from([None, 1e-30, 0.01, 1.0, 1e3, 1e38]))
def test_sparse_attention_with_nonfinite_and_extreme_values(data, layout, D, backend, scale):
    N = data.draw(st.integers(1, layout.seq_len))
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    q, k, v = (data.draw(tensors((B, H, N, D))) for _ in range(3))
    g = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1))))
    mask = layout.dense_mask(N)
    dead = nan_rows(q, k, v, mask)

    def run(q, k, v, g):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = dalle_fast.sparse_attention(q, k, v, layout, scale=scale, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), g))

    out, dq, dk, dv = run(q, k, v, g)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isnan(out[dead]).all()
    # finite inputs whose scores overflow float32 give NaN rows (the float32 reference's gradients
    # then carry NaN from rows with a zero gradient too: 0 * NaN)
    big = lambda t: float(t.abs().nan_to_num(0, 0, 0).max())  # noqa: E731
    no_overflow = big(q) * big(k) * D < 1e30 and (scale or 1) <= 1e3 and big(v) < 1e30  # (raw scores first)
    # every other row, and every gradient, as when the unreadable values are zeros and the NaN rows
    # get no gradient
    clean = run(zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v), g * (~dead).unsqueeze(-1))
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), clean):
        if name == "out":
            ours, ref = ours[~dead], ref[~dead]
        elif backend == "reference" and not no_overflow:
            continue
        elif not no_overflow:
            # the zeroed run overflows too (values near 3e38 sum to inf in the output, and a NaN row's
            # zero gradient times it is NaN): compare where its gradients are finite
            keep = torch.isfinite(ref)
            ours, ref = ours[keep], ref[keep]
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-30, equal_nan=True, msg=f"{layout} {name}")
    # the two backends agree on which rows are NaN where no float32 overflow is possible
    if no_overflow:
        other = "reference" if backend == "cpu" else "cpu"
        o2 = dalle_fast.sparse_attention(q, k, v, layout, scale=scale, backend=other)
        assert torch.equal(torch.isnan(out).all(-1), torch.isnan(o2).all(-1)), layout
        assert torch.isfinite(out[~dead]).all()


# ------------------------------------------------------------------------------------------ decode_attention
@FUZZ
@given(data=st.data(), layout=layouts(max_t=12, max_s=6), D=st.integers(1, 16),
       backend=st.sampled_from(["cpu", "reference"]))
def test_decode_attention_with_nonfinite_and_extreme_values(data, layout, D, backend):
    B, H, N = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), layout.seq_len
    L = N + data.draw(st.integers(0, 3))
    pos = torch.tensor([data.draw(st.integers(0, N - 1)) for _ in range(B)])
    q, kn, vn = (data.draw(tensors((B, H, 1, D))) for _ in range(3))
    kc, vc = data.draw(tensors((B, H, L, D))), data.draw(tensors((B, H, L, D)))
    read = torch.zeros(B, L, dtype=torch.bool)  # the slots each row reads (its new key included)
    for b, p in enumerate(pos.tolist()):
        read[b, layout.decode_keys(p)] = True
    with torch.no_grad():
        out = dalle_fast.decode_attention(q, kn, vn, kc.clone(), vc.clone(), pos, layout, backend=backend)
        # zeros in every slot a row does not read change nothing
        kz, vz = (torch.where(read[:, None, :, None], t, torch.zeros(())) for t in (kc, vc))
        torch.testing.assert_close(
            out, dalle_fast.decode_attention(q, kn, vn, kz, vz, pos, layout, backend=backend),
            rtol=0, atol=0, equal_nan=True)
    kw, vw = kc.clone(), vc.clone()
    kw[torch.arange(B), :, pos], vw[torch.arange(B), :, pos] = kn[:, :, 0], vn[:, :, 0]
    sel = read[:, None, :, None]
    dead = (~torch.isfinite(q).all(-1).squeeze(-1)
            | ~(torch.isfinite(torch.where(sel, kw, 0.0)).all(-1) & torch.isfinite(torch.where(sel, vw, 0.0)).all(-1)).all(-1))
    assert torch.isnan(out[:, :, 0][dead]).all()


# ------------------------------------------------------------------------------------------ sample
LOGITS = [float("-inf"), -1e30, -3.0, -1.0, 0.0, 0.5, 2.0, 1e30, 3.0e38]


@FUZZ
@given(data=st.data(), B=st.integers(1, 3), V=st.integers(1, 40), temperature=st.sampled_from([0.0, 1e-30, 0.5, 1.0, 1e30]),
       top_k=st.sampled_from([0, 1, 3, 10**30]), top_p=st.sampled_from([1e-9, 0.3, 1.0]),
       cfg=st.sampled_from([None, 1.0, 2.0, -1.0]))
def test_sample_with_nonfinite_and_extreme_logits(data, B, V, temperature, top_k, top_p, cfg):
    def logits():
        x = torch.tensor([[data.draw(st.sampled_from(LOGITS)) for _ in range(V)] for _ in range(B)])
        for _ in range(data.draw(st.integers(0, 2))):
            x[data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, V - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf")]))
        return x

    x = logits()
    u = logits() if cfg is not None else None
    lo = data.draw(st.integers(0, V - 1))
    hi = data.draw(st.integers(lo + 1, V))
    kw = dict(seeds=torch.arange(B), step=data.draw(st.integers(0, 2**62)), temperature=temperature, top_k=top_k,
              top_p=top_p, uncond_logits=u, cfg_scale=cfg if cfg is not None else 1.0, vocab_range=(lo, hi))
    results = {}
    for backend in ("cpu", "reference"):
        try:
            results[backend] = dalle_fast.sample(x, backend=backend, **kw)
        except (ValueError, RuntimeError) as err:
            assert "NaN or +inf" in str(err) or "-inf" in str(err), err
            results[backend] = None
    assert (results["cpu"] is None) == (results["reference"] is None), results
    if results["cpu"] is not None:
        support = reference.sample_support(x, temperature, min(top_k, V), top_p, u, kw["cfg_scale"], (lo, hi))
        for b, t in enumerate(results["cpu"].tolist()):
            assert lo <= t < hi and support[b, t] > 0, (b, t, support[b])


def test_fuzzed_scale_bounds():
    """The softmax scale: anything outside (0, 2e38] in float32 is a ValueError, never NaN outputs."""
    layout = Layout("row", 2, 3)
    q = torch.randn(1, 1, layout.seq_len, 4)
    for scale in (math.nextafter(2e38, math.inf), 1e-50, -0.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="scale"):
            dalle_fast.sparse_attention(q, q, q, layout, scale=scale)
