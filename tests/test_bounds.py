"""Sizes and scalars at the edge of what the kernels represent: the softmax scale in float32, Layout
sizes within int32 positions, decode memory by the keys a position reads, sample's dtypes and top_k."""
import os
import re

import pytest
import torch

import dalle_fast
from dalle_fast import Layout, reference


def test_scale_is_checked_in_float32():
    """A finite float64 scale that overflows float32 (the kernels' precision) made every output NaN."""
    layout = Layout("row", 3, 4)
    q = k = v = torch.randn(1, 1, layout.seq_len, 8)
    for scale in (1e39, 3.0e38, float("inf"), 1e-46, 0.0, -1.0, float("nan")):
        for backend in ("cpu", "reference"):
            with pytest.raises(ValueError, match="scale"):
                dalle_fast.sparse_attention(q, k, v, layout, scale=scale, backend=backend)
        kc = torch.zeros(1, 1, layout.seq_len, 8)
        with pytest.raises(ValueError, match="scale"):
            dalle_fast.decode_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], kc, kc.clone(), torch.tensor(0),
                                        layout, scale=scale)
    # the op called directly checks it too
    with pytest.raises(ValueError, match="scale"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, *layout.params(), 1e39)
    # the largest accepted scale still gives finite outputs for small scores
    big = 1e38
    out = dalle_fast.sparse_attention(q * 1e-20, k * 1e-20, v, layout, scale=big)
    assert torch.isfinite(out).all()


def test_layout_sizes_are_bounded_where_they_are_made():
    """image_size=3037000500 overflowed the C++ sequence length (its error printed a negative number)."""
    with pytest.raises(ValueError, match=r"text_len \+ image_size\*\*2 = 9223372037000250004 .* 2147483647"):
        Layout("row", 4, 3037000500)
    with pytest.raises(ValueError, match="2147483647"):
        Layout("col", 4, 2**31)
    with pytest.raises(ValueError, match="text_len"):
        Layout("full", 2**31, 1)
    for name, kw in (("kernel_size", {"kernel_size": 2**40 + 1}), ("dilation", {"dilation": 2**40})):
        with pytest.raises(ValueError, match=name):
            Layout("conv_like", 4, 8, **kw)
    big = Layout("full", 1, 46340)  # the largest square image below 2**31 positions
    assert big.seq_len == 1 + 46340**2 < 2**31
    # the C++ ops check the same bound, with the true (positive) numbers in the message
    with pytest.raises(ValueError, match=r"4 \+ 3037000500\*\*2") as err:
        torch.ops.dalle_fast._max_decode_keys(1, 4, 3037000500, 11, 1)
    assert not re.search(r"-\d", str(err.value).splitlines()[0])


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set (Linux)
        f.write("5")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_decode_memory_follows_the_keys_a_position_reads():
    """One step at position 10 of a 20-slot cache with Layout('full', 4, 8000) sized its key table
    by the layout's 64M-key maximum (~3 GB, ~5 s)."""
    layout = Layout("full", 4, 8000)
    B, H, D = 4, 2, 8
    q = torch.randn(B, H, 1, D)
    kc, vc = torch.randn(B, H, 20, D), torch.randn(B, H, 20, D)
    pos = torch.full((B,), 10)
    with torch.no_grad():
        dalle_fast.decode_attention(q, q, q, kc, vc, pos, layout)  # warm up (allocator, thread pool)
        _reset_peak_rss()
        before = _peak_rss_bytes()
        out = dalle_fast.decode_attention(q, q, q, kc, vc, pos, layout)
        grown = _peak_rss_bytes() - before
    assert grown < 64 * 2**20, f"one decode step of 11 keys grew the peak memory by {grown / 2**20:.0f} MiB"
    ref = reference.decode_attention(q, q, q, kc.clone(), vc.clone(), pos, layout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sample_takes_float64_logits():
    """sample refused float64 logits, so teacher_forced_logits failed on a float64 model."""
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, -1.0, 9.0]], dtype=torch.float64)
    seeds = torch.tensor([1, 2])
    for backend in ("cpu", "reference"):
        tokens = dalle_fast.sample(logits, seeds=seeds, step=0, temperature=0.0, backend=backend)
        assert tokens.tolist() == [1, 2]
        drawn = dalle_fast.sample(logits, seeds=seeds, step=3, uncond_logits=logits.flip(1), cfg_scale=2.0,
                                  backend=backend)
        assert drawn.tolist() == dalle_fast.sample(logits.float(), seeds=seeds, step=3,
                                                   uncond_logits=logits.flip(1).float(), cfg_scale=2.0,
                                                   backend=backend).tolist()


def test_teacher_forced_logits_on_a_float64_model(monkeypatch):
    """(float64 attention runs on the reference backend; the model's logits reach sample as float64)"""
    from dalle_fast.generate import teacher_forced_logits
    from dalle_fast.models.dalle import DALLE, DALLEConfig
    torch.manual_seed(0)
    cfg = DALLEConfig(text_vocab=32, text_len=5, image_size=3, image_vocab=16, dim=16, depth=2, heads=2,
                      dim_head=8)
    model = DALLE(cfg).double().eval()
    monkeypatch.setenv("DALLE_FAST_BACKEND", "reference")
    text = torch.randint(1, 20, (2, cfg.text_len - 1))
    codes = torch.randint(0, cfg.image_vocab, (2, cfg.image_size, cfg.image_size))
    with torch.no_grad():
        for attention in ("sparse", "dense"):
            logits = teacher_forced_logits(model, text, codes, attention=attention)
            assert logits.shape == (2, 9, cfg.image_vocab) and torch.isfinite(logits).all()
            assert logits.dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_top_k_beyond_the_vocabulary_keeps_every_token(backend):
    """top_k=10**30 gave "Expected a value of type 'int' ... found type 'int'"."""
    logits = torch.randn(3, 50)
    seeds = torch.arange(3)
    for step in range(5):
        ref = dalle_fast.sample(logits, seeds=seeds, step=step, top_k=0, backend=backend)
        for top_k in (50, 51, 2**63 - 1, 10**30):
            assert torch.equal(dalle_fast.sample(logits, seeds=seeds, step=step, top_k=top_k, backend=backend), ref)
