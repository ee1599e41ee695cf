"""sample: exact filtered sets, greedy, batch independence, determinism, distribution (chi-square),
agreement with the full-sort reference, errors, opcheck; CUDA == CPU and the NaN flag (GPU only)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dalle_fast
from dalle_fast import reference

# every test of this module runs once per instruction set of the CPU kernels (conftest.py)
pytestmark = pytest.mark.usefixtures("every_cpu_isa")

try:
    from scipy.stats import chi2
except ImportError:  # pragma: no cover
    chi2 = None


def draws(logits_row, n, step=0, seed0=0, **kw):
    """n independent draws from one row: n copies of the row with seeds seed0 .. seed0+n-1."""
    x = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    u = kw.pop("uncond_row", None)
    if u is not None:
        kw["uncond_logits"] = u.unsqueeze(0).expand(n, -1).contiguous()
    return dalle_fast.sample(x, seeds=torch.arange(seed0, seed0 + n), step=torch.tensor(step), **kw)


def support(logits_row, **kw):
    u = kw.pop("uncond_row", None)
    if u is not None:
        kw["uncond_logits"] = u.unsqueeze(0)
    return reference.sample_support(logits_row.unsqueeze(0), **kw)[0]


CONFIGS = [
    dict(top_k=5),
    dict(top_p=0.6),
    dict(top_k=12, top_p=0.8, temperature=0.7),
    dict(vocab_range=(10, 40), top_k=7),
    dict(vocab_range=(3, 50), top_p=0.5, temperature=2.0),
    dict(top_k=1),
    dict(top_p=1e-6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_sets_over_many_seeds(cfg):
    g = torch.Generator().manual_seed(0)
    # integer-valued logits: many ties, so the index tie-break matters; plus some -inf
    x = torch.randint(-3, 4, (64,), generator=g).float() * 0.5
    x[torch.randperm(64, generator=g)[:6]] = float("-inf")
    kw = dict(cfg, temperature=cfg.get("temperature", 1.0))
    sup = support(x, **kw) > 0
    tok = draws(x, 4000, **kw)
    seen = torch.zeros(64, dtype=torch.bool)
    seen[tok] = True
    assert not (seen & ~sup).any(), f"drew outside the set: {torch.nonzero(seen & ~sup).flatten().tolist()}"
    # the set is also not too small: every kept token with probability >= 1% shows up
    p = support(x, **kw)
    assert (seen | (p < 0.01)).all() or not sup.any()
    assert (seen == sup).all() or (p[sup & ~seen] < 0.01).all()


def test_top_k_tie_break_is_lowest_index():
    x = torch.zeros(10)
    x[7] = 1.0
    tok = draws(x, 500, top_k=3)  # 7, then ties 0 and 1
    assert set(tok.tolist()) == {0, 1, 7}


def test_top_p_keeps_crossing_token():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(x, 500, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7, 0.8 >= 0.7
    assert set(draws(x, 500, top_p=0.45).tolist()) == {0}
    assert set(draws(x, 2000, top_p=0.9).tolist()) == {0, 1, 2}


def test_greedy_is_argmax_lowest_index():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (16, 100), generator=g).float()
    tok = dalle_fast.sample(x, seeds=torch.arange(16), step=torch.tensor(3), temperature=0.0, top_k=4, top_p=0.3)
    assert torch.equal(tok, x.argmax(1))  # torch.argmax returns the first maximal index
    tok = dalle_fast.sample(x, seeds=torch.arange(16), step=torch.tensor(3), temperature=0.0, vocab_range=(50, 90))
    assert torch.equal(tok, x[:, 50:90].argmax(1) + 50)


def test_single_unmasked_token_and_neg_inf():
    x = torch.full((3, 30), float("-inf"))
    x[0, 4] = 0.0
    x[1, 29] = -1e30
    x[2, 0] = 5.0
    x[2, 1] = 5.0
    for kw in (dict(), dict(top_k=3), dict(top_p=0.1), dict(temperature=0.01)):
        for s in range(5):
            tok = dalle_fast.sample(x, seeds=torch.arange(3) + 10 * s, step=torch.tensor(s), **kw)
            assert tok[0] == 4 and tok[1] == 29 and tok[2] in (0, 1)


def test_batch_independence_and_determinism():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 300, generator=g) * 3
    seeds = torch.randint(0, 2**62, (12,), generator=g)
    kw = dict(top_k=50, top_p=0.9, temperature=0.8, step=torch.tensor(17))
    full = dalle_fast.sample(x, seeds=seeds, **kw)
    assert torch.equal(full, dalle_fast.sample(x, seeds=seeds, **kw))  # rerun
    for b in range(12):  # alone
        assert dalle_fast.sample(x[b:b + 1], seeds=seeds[b:b + 1], **kw)[0] == full[b]
    perm = torch.randperm(12, generator=g)
    assert torch.equal(dalle_fast.sample(x[perm], seeds=seeds[perm], **kw), full[perm])
    other = dalle_fast.sample(x, seeds=seeds, **dict(kw, step=torch.tensor(18)))
    assert (other != full).any()


def test_matches_full_sort_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 500, generator=g) * 2
    u = torch.randn(200, 500, generator=g) * 2
    seeds = torch.arange(200) * 1000 + 1
    for kw in (dict(top_k=40), dict(top_p=0.85, temperature=1.3), dict(top_k=100, top_p=0.7),
               dict(uncond_logits=u, cfg_scale=3.0, top_k=64), dict(vocab_range=(100, 400), top_p=0.9)):
        ours = dalle_fast.sample(x, seeds=seeds, step=torch.tensor(5), **kw)
        ref = dalle_fast.sample(x, seeds=seeds, step=torch.tensor(5), backend="reference", **kw)
        agree = (ours == ref).float().mean().item()
        assert agree >= 0.99, (kw, agree)  # equal unless u sits within rounding of a CDF step


@pytest.mark.skipif(chi2 is None, reason="needs scipy")
@pytest.mark.parametrize("kw", [dict(top_k=10, top_p=0.9), dict(temperature=0.5), dict(top_p=0.7, vocab_range=(2, 18))],
                         ids=str)
def test_chi_square_follows_filtered_softmax(kw):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, generator=g) * 1.5
    p = support(x, temperature=kw.get("temperature", 1.0), **{k: v for k, v in kw.items() if k != "temperature"})
    n = 20000
    tok = draws(x, n, step=11, **kw)
    counts = torch.bincount(tok, minlength=20).double()
    keep = p > 0
    assert counts[~keep].sum() == 0
    expected = n * p[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum().item()
    df = int(keep.sum()) - 1
    assert stat < chi2.ppf(0.999, df), (stat, df)
    # draws along steps of one seed follow the same distribution
    steps = torch.stack([dalle_fast.sample(x.unsqueeze(0), seeds=torch.tensor([42]), step=torch.tensor(s), **kw)
                         for s in range(3000)]).flatten()
    c2 = torch.bincount(steps, minlength=20).double()
    e2 = 3000 * p[keep]
    assert ((c2[keep] - e2) ** 2 / e2).sum().item() < chi2.ppf(0.999, df)


def test_guidance_and_low_precision():
    g = torch.Generator().manual_seed(5)
    c, u = torch.randn(8, 128, generator=g), torch.randn(8, 128, generator=g)
    for dt in (torch.bfloat16, torch.float16):
        tok = dalle_fast.sample(c.to(dt), seeds=torch.arange(8), step=torch.tensor(0), uncond_logits=u.to(dt),
                                cfg_scale=4.0, top_k=3)
        ref = reference.sample_support(c.to(dt), top_k=3, uncond_logits=u.to(dt), cfg_scale=4.0)
        assert (ref.gather(1, tok[:, None]) > 0).all()
    # -inf in uncond masks the token
    u2 = u.clone()
    u2[:, :64] = float("-inf")
    tok = draws(c[0], 500, uncond_row=u2[0], cfg_scale=2.0)
    assert (tok >= 64).all()


@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 80), top_k=st.integers(0, 90), top_p=st.floats(0.01, 1.0), temp=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
       seed=st.integers(0, 2**62), step=st.integers(0, 2**40), data=st.data())
def test_property_never_outside_the_set(V, top_k, top_p, temp, seed, step, data):
    vals = data.draw(st.lists(st.sampled_from([float("-inf"), -2.0, 0.0, 0.5, 1.0, 3.0]), min_size=V, max_size=V))
    x = torch.tensor(vals)
    lo = data.draw(st.integers(0, V - 1))
    hi = data.draw(st.integers(lo + 1, V))
    if torch.isneginf(x[lo:hi]).all():
        x[hi - 1] = 0.0
    kw = dict(top_k=top_k, top_p=top_p, temperature=temp, vocab_range=(lo, hi))
    tok = int(dalle_fast.sample(x[None], seeds=torch.tensor([seed]), step=torch.tensor(step), **kw)[0])
    p = reference.sample_support(x[None], **kw)[0]
    assert p[tok] > 0


def test_errors():
    x = torch.zeros(2, 10)
    s = torch.arange(2)
    st0 = torch.tensor(0)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 contain NaN"):
        dalle_fast.sample(bad, seeds=s, step=st0)
    dalle_fast.sample(bad, seeds=s, step=st0, vocab_range=(4, 10))  # NaN outside the range is ignored
    with pytest.raises(RuntimeError, match="NaN or \\+inf"):
        dalle_fast.sample(x.clone().fill_(float("inf")), seeds=s, step=st0)
    with pytest.raises(RuntimeError, match="-inf"):
        dalle_fast.sample(torch.full((2, 10), float("-inf")), seeds=s, step=st0)
    cases = [
        (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"), (dict(vocab_range=(5, 5)), "vocab_range"),
        (dict(vocab_range=(-1, 3)), "vocab_range"), (dict(vocab_range=(0, 11)), "vocab_range"),
        (dict(vocab_range=3), "vocab_range"), (dict(seeds=torch.arange(3)), "seeds"),
        (dict(seeds=torch.arange(2).int()), "seeds"), (dict(step=torch.tensor(0.5)), "step"),
        (dict(step=torch.zeros(2, dtype=torch.long)), "step"), (dict(uncond_logits=torch.zeros(2, 9)), "uncond"),
        (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(backend="triton"), "backend"),
        (dict(backend="cuda"), "cuda"),
    ]
    for kw, name in cases:
        args = dict(seeds=s, step=st0)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            dalle_fast.sample(x, **args)
    with pytest.raises(ValueError, match="logits"):
        dalle_fast.sample(torch.zeros(10), seeds=s, step=st0)
    with pytest.raises(ValueError, match="logits"):  # (float64 is taken, computed in float32)
        dalle_fast.sample(x.long(), seeds=s, step=st0)


def test_python_int_step_and_error_flag():
    x = torch.randn(3, 20)
    a = dalle_fast.sample(x, seeds=torch.arange(3), step=7)
    b, flag = dalle_fast.sample(x, seeds=torch.arange(3), step=torch.tensor([7]), return_error_flag=True)
    assert torch.equal(a, b) and flag.dtype == torch.int32 and (flag == 0).all()


def test_philox_known_answer():
    # Random123 known-answer vector for Philox4x32-10 (zero counter, zero key)
    assert reference.philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("guided", [False, True])
def test_opcheck(guided):
    x = torch.randn(4, 50)
    u = torch.randn(4, 50) if guided else None
    args = (x, torch.arange(4), torch.tensor(3), u, 2.0, 0.9, 10, 0.8, 0, 50)
    torch.library.opcheck(torch.ops.dalle_fast.sample.default, args)


def test_signed_zeros_tie_by_index():
    # -0.0 == +0.0: a tie, broken by the lower index as in the reference's stable sort (the order
    # keys once ranked every +0 above every -0, so top-k/top-p kept the wrong token)
    x = torch.tensor([-0.0, 0.0])
    assert support(x, top_k=1).tolist() == [1.0, 0.0]
    assert draws(x, 16, top_k=1).tolist() == [0] * 16
    assert draws(x, 4, temperature=0.0).tolist() == [0] * 4
    y = torch.tensor([0.0, -0.0, 0.0])
    p = support(y, top_p=0.5)
    assert p.tolist() == [0.5, 0.5, 0.0]
    tok = draws(y, 64, top_p=0.5)
    assert set(tok.tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [1e-39, 1e-42, 1e-300])
def test_tiny_positive_temperature_samples_the_tied_maxima(temperature):
    # log2(e) / temperature overflows float below ~4e-39; that once made the draw greedy (always the
    # lowest index), where the reference (softmax of x / temperature) shares the mass of the ties
    x = torch.tensor([1.0, 1.0, 0.5, float("-inf")])
    assert support(x, temperature=temperature).tolist() == [0.5, 0.5, 0.0, 0.0]
    tok = draws(x, 64, temperature=temperature)
    assert set(tok.tolist()) == {0, 1}
    tok = draws(x, 64, temperature=temperature, top_p=0.4)  # the shortest prefix: rank 0 only
    assert set(tok.tolist()) == {0}


def test_vocab_range_too_wide_for_exact_weights_raises():
    # 2^24 tokens of weight 2^40 sum to 2^64: the 64-bit sums wrapped, and 2^24 + 16 equal logits
    # were drawn from the first 16 tokens only; such ranges are refused with a clear error
    n = 1 << 24
    x = torch.zeros(1, n + 16)
    with pytest.raises(ValueError, match="vocab_range"):
        torch.ops.dalle_fast.sample(x, torch.tensor([3]), torch.tensor(0), None, 1.0, 1.0, 0, 1.0, 0, n + 16)
    with pytest.raises(ValueError, match="vocab_range"):
        dalle_fast.sample(x, seeds=torch.tensor([3]), step=0, vocab_range=(16, n + 16))
    # the widest supported range still samples
    tok = dalle_fast.sample(x, seeds=torch.tensor([3]), step=0, vocab_range=(17, n + 16))
    assert 17 <= int(tok) < n + 16


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("V", [100, 8192, 24576, 70000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_identical_to_cpu(V, dtype):
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(48, V, generator=g) * 3).to(dtype)
    x[:8] = torch.randint(-2, 3, (8, V), generator=g).to(dtype)  # ties
    x[8:12, : V // 2] = float("-inf")
    u = (torch.randn(48, V, generator=g) * 3).to(dtype)
    seeds = torch.randint(0, 2**62, (48,), generator=g)
    for kw in (dict(), dict(temperature=0.0), dict(top_k=50), dict(top_k=V // 3), dict(top_p=0.9),
               dict(top_k=200, top_p=0.5, temperature=0.7), dict(uncond_logits=u, cfg_scale=3.0, top_k=20),
               dict(vocab_range=(V // 4, V - 3), top_p=0.95)):
        uu = kw.pop("uncond_logits", None)
        cpu = dalle_fast.sample(x, seeds=seeds, step=torch.tensor(9), uncond_logits=uu, **kw)
        gpu = dalle_fast.sample(x.cuda(), seeds=seeds.cuda(), step=torch.tensor(9, device="cuda"),
                                uncond_logits=None if uu is None else uu.cuda(), **kw)
        assert torch.equal(cpu, gpu.cpu()), kw


@pytest.mark.gpu
def test_cuda_nan_flag_without_raising():
    x = torch.randn(4, 1000, device="cuda")
    x[1, 10] = float("nan")
    x[2] = float("-inf")
    tok, flag = dalle_fast.sample(x, seeds=torch.arange(4, device="cuda"), step=torch.tensor(0, device="cuda"),
                                  top_k=10, return_error_flag=True)
    assert flag.tolist() == [0, 1, 2, 0]
    assert ((tok >= 0) & (tok < 1000)).all()


@pytest.mark.gpu
def test_cuda_chi_square():
    if chi2 is None:
        pytest.skip("needs scipy")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, generator=g)
    p = support(x, top_k=15, top_p=0.9)
    n = 50000
    tok = dalle_fast.sample(x.cuda().expand(n, -1).contiguous(), seeds=torch.arange(n, device="cuda"),
                            step=torch.tensor(0, device="cuda"), top_k=15, top_p=0.9).cpu()
    counts = torch.bincount(tok, minlength=30).double()
    keep = p > 0
    assert counts[~keep].sum() == 0
    e = n * p[keep]
    assert ((counts[keep] - e) ** 2 / e).sum().item() < chi2.ppf(0.999, int(keep.sum()) - 1)


@pytest.mark.gpu
def test_cuda_signed_zeros_tiny_temperature_and_wide_range():
    x = torch.tensor([[-0.0, 0.0]], device="cuda").expand(16, 2).contiguous()
    s = torch.arange(16, device="cuda")
    st0 = torch.tensor(0, device="cuda")
    assert dalle_fast.sample(x, seeds=s, step=st0, top_k=1).tolist() == [0] * 16
    assert dalle_fast.sample(x, seeds=s, step=st0, temperature=0.0).tolist() == [0] * 16
    y = torch.tensor([[1.0, 1.0, 0.5]], device="cuda").expand(64, 3).contiguous()
    tok = dalle_fast.sample(y, seeds=torch.arange(64, device="cuda"), step=st0, temperature=1e-40)
    cpu = dalle_fast.sample(y.cpu(), seeds=torch.arange(64), step=0, temperature=1e-40)
    assert set(tok.tolist()) == {0, 1} and torch.equal(tok.cpu(), cpu)
    with pytest.raises(ValueError, match="vocab_range"):
        dalle_fast.sample(torch.zeros(1, (1 << 24) + 1, device="cuda"), seeds=s[:1], step=st0)


def test_integers_beyond_int64_are_value_errors_naming_the_argument():
    """The wrapper coerces Python ints to the op's int64 arguments: one out of range is a
    ValueError naming it, not the dispatcher's type error."""
    x, s = torch.randn(2, 10), torch.arange(2)
    for kw, name in ((dict(vocab_range=(0, 2**70)), "vocab_range"), (dict(vocab_range=(-2**70, 5)), "vocab_range"),
                     (dict(top_k=-2**70), "top_k"), (dict(step=2**64), "step")):
        with pytest.raises(ValueError, match=name):
            dalle_fast.sample(x, seeds=s, **{"step": 0, **kw})
    assert dalle_fast.sample(x, seeds=s, step=0, top_k=2**70).shape == (2,)  # keeps every token
    layout = dalle_fast.Layout("row", 4, 3)
    q = torch.randn(1, 1, layout.seq_len, 8)
    with pytest.raises(ValueError, match="scale must be a number within float range"):
        dalle_fast.sparse_attention(q, q, q, layout, scale=2**2000)
