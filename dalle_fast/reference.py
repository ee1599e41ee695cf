"""Plain PyTorch references for every dalle_fast op (dense, slow, obviously correct).

They compute in the input dtype's "reference precision": float32 inputs (and lower) are upcast to
float32, float64 stays float64. Tests compare kernels against the float64 result and measure the
tolerance by what this float32 reference itself reaches against float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .masks import Layout

__all__ = ["sparse_attention", "sparse_attention_lse"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` bool: rows of ``t`` ``(..., N, D)`` holding a NaN or an infinity."""
    return ~torch.isfinite(t).all(-1)


def sparse_attention_lse(q, k, v, layout: Layout, scale: Optional[float] = None, compute_dtype=None):
    """Dense masked attention. q, k, v: ``(B, H, N, D)``. Returns ``(out (B,H,N,D), lse (B,H,N))``.

    ``out`` is in ``compute_dtype`` (default: float64 for float64 inputs, else float32) and ``lse``
    is the natural-log log-sum-exp of the scaled, masked scores of each query row.

    Non-finite values: keys and values outside a query's mask never influence its output, lse or
    gradients, whatever they hold; a row whose query, or any key or value it may read, holds NaN or
    an infinity outputs NaN (out and lse) and passes no gradient. (Masked products are zeroed: a
    masked probability of 0 times a NaN value would otherwise be NaN.)
    """
    n = q.shape[-2]
    dt = compute_dtype or _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = layout.dense_mask(n, device=q.device)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    bad_kv = _nonfinite_rows(k) | _nonfinite_rows(v)
    poisoned = _nonfinite_rows(q) | (mask & bad_kv.unsqueeze(-2)).any(-1)
    zero = q.new_zeros(())
    q = torch.where(poisoned.unsqueeze(-1), zero, q)  # (so that nothing of a NaN row reaches a gradient)
    k = torch.where(bad_kv.unsqueeze(-1), zero, k)
    v = torch.where(bad_kv.unsqueeze(-1), zero, v)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v)
    return out.masked_fill(poisoned.unsqueeze(-1), float("nan")), lse.masked_fill(poisoned, float("nan"))


def sparse_attention(q, k, v, layout: Layout, scale: Optional[float] = None, compute_dtype=None):
    """Dense masked attention, output cast back to the input dtype unless ``compute_dtype`` is given.

    Differentiable (plain autograd through the dense computation).
    """
    out, _ = sparse_attention_lse(q, k, v, layout, scale, compute_dtype)
    return out if compute_dtype is not None else out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# KV-cached decoding references
# ---------------------------------------------------------------------------------------------
__all__ += ["decode_attention", "philox_u64", "sample_support", "sample"]


def decode_attention(q, k_new, v_new, k_cache, v_cache, pos, layout: Layout, scale: Optional[float] = None,
                     text_k_cache=None, text_v_cache=None, prompt_index=None, compute_dtype=None):
    """Reference decode step: writes ``k_new``/``v_new`` into the caches at ``pos`` (in place), then
    attends with ``q`` over ``layout.decode_keys(pos[b])`` per row.

    q, k_new, v_new: ``(B, H, 1, D)``; caches ``(B, H, L, D)``; ``pos`` int64 ``(B,)`` or 0-dim.
    With shared text caches ``text_k_cache``/``text_v_cache`` ``(P, H, >=T, D)`` and
    ``prompt_index`` ``(B,)``, row ``b`` reads its text keys from prompt ``prompt_index[b]`` and the
    per-row caches hold image positions only (position ``p`` at slot ``p - T``).
    Returns ``(B, H, 1, D)`` in ``compute_dtype`` if given, else q's dtype. A head whose query or
    any key or value it reads is not finite outputs NaN (as :func:`sparse_attention_lse`).
    """
    B, H, _, D = q.shape
    dt = compute_dtype or _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pos_list = pos.reshape(-1).expand(B).tolist() if pos.dim() == 0 else pos.tolist()
    shared = text_k_cache is not None
    offset = layout.text_len if shared else 0
    outs = []
    for b, p in enumerate(pos_list):
        k_cache[b, :, p - offset] = k_new[b, :, 0]
        v_cache[b, :, p - offset] = v_new[b, :, 0]
        keys = layout.decode_keys(int(p)).to(k_cache.device)
        if shared:
            pr = int(prompt_index[b])
            text = keys[keys < layout.text_len]
            image = keys[keys >= layout.text_len] - offset
            kk = torch.cat([text_k_cache[pr][:, text], k_cache[b][:, image]], dim=1)
            vv = torch.cat([text_v_cache[pr][:, text], v_cache[b][:, image]], dim=1)
        else:
            kk, vv = k_cache[b][:, keys], v_cache[b][:, keys]
        s = torch.matmul(q[b].to(dt), kk.to(dt).transpose(-1, -2)) * scale  # (H, 1, n)
        out = torch.matmul(torch.softmax(s, dim=-1), vv.to(dt))
        # a head whose query or any key or value it reads is not finite: NaN (as sparse_attention)
        bad = _nonfinite_rows(q[b]).any(-1) | _nonfinite_rows(kk).any(-1) | _nonfinite_rows(vv).any(-1)
        outs.append(out.masked_fill(bad[:, None, None], float("nan")))
    out = torch.stack(outs) if outs else q.new_empty(q.shape, dtype=dt)  # (an empty batch)
    return out if compute_dtype is not None else out.to(q.dtype)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
SAMPLE_DOMAIN = 0x534D504C


def philox4x32_10(counter, key):
    """Philox4x32-10 block (Salmon et al., SC'11) on Python ints: 4 counter words, 2 key words."""
    c = [int(x) & _MASK32 for x in counter]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(10):
        p0, p1 = _PHILOX_M[0] * c[0], _PHILOX_M[1] * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & _MASK32]
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c


def philox_u64(seed: int, step: int) -> int:
    """The 64 random bits of the draw for (seed, step) (csrc/common/sampling.h)."""
    seed, step = int(seed) & (2**64 - 1), int(step) & (2**64 - 1)
    c = philox4x32_10((step & _MASK32, step >> 32, SAMPLE_DOMAIN, 0), (seed & _MASK32, seed >> 32))
    return (c[1] << 32) | c[0]


def _guided(logits, uncond_logits, cfg_scale):
    """float32 ``u + cfg_scale * (x - u)`` rounded once after the multiply-add, as the kernels' fmaf
    (exact in float64: a float32 product fits its mantissa), -inf where either is -inf."""
    x = logits.float()
    if uncond_logits is None:
        return x
    u = uncond_logits.float()
    c = float(torch.tensor(cfg_scale, dtype=torch.float32))
    mix = (c * (x - u).double() + u.double()).float()
    masked = torch.isneginf(x) | torch.isneginf(u)
    return torch.where(masked, torch.full_like(x, float("-inf")), mix)


def _bad(t):
    return torch.isnan(t) | torch.isposinf(t)


def sample_support(logits, temperature=1.0, top_k=0, top_p=1.0, uncond_logits=None, cfg_scale=1.0,
                   vocab_range=None):
    """The filtered distribution of :func:`dalle_fast.sample`, with a full sort.

    logits ``(B, V)``. Returns ``probs (B, V)`` float64: the softmax of ``x / temperature`` over the
    kept set (zero elsewhere), where ``x`` is the guided logit restricted to ``vocab_range``, the
    order is descending ``x`` with ties by ascending index, top-k keeps the first ``top_k`` ranks
    and top-p the shortest rank prefix whose probability reaches ``top_p``. For temperature 0 the
    result is one-hot at the argmax (lowest index on ties).
    """
    x = _guided(logits, uncond_logits, cfg_scale)
    B, V = x.shape
    lo, hi = vocab_range if vocab_range is not None else (0, V)
    inside = torch.zeros(V, dtype=torch.bool, device=x.device)
    inside[lo:hi] = True
    inputs = [logits.float()] + ([uncond_logits.float()] if uncond_logits is not None else [])
    if any(_bad(t[:, lo:hi]).any() for t in [x] + inputs):  # (as the kernels: inputs and guided mix)
        raise ValueError("logits (or uncond_logits / the guided mix) contain NaN or +inf inside vocab_range")
    x = torch.where(inside, x, torch.full_like(x, float("-inf"))).double()
    if torch.isneginf(x).all(dim=1).any():
        raise ValueError("a row has only -inf logits inside vocab_range")
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    xs = torch.gather(x, 1, order)
    finite = ~torch.isneginf(xs)
    rank = torch.arange(V, device=x.device).expand(B, V)
    if temperature == 0:
        keep_sorted = rank == 0
        probs_sorted = keep_sorted.double()
    else:
        keep_sorted = finite & ((rank < top_k) if top_k > 0 else True)
        z = torch.where(keep_sorted, (xs - xs[:, :1]) / temperature, torch.full_like(xs, float("-inf")))
        probs_sorted = torch.softmax(z, dim=1)
        if top_p < 1.0:
            before = torch.cumsum(probs_sorted, dim=1) - probs_sorted  # mass strictly before each rank
            keep_sorted = keep_sorted & (before < top_p)
            probs_sorted = torch.where(keep_sorted, probs_sorted, torch.zeros_like(probs_sorted))
            probs_sorted = probs_sorted / probs_sorted.sum(dim=1, keepdim=True)
    return torch.zeros_like(x).scatter(1, order, probs_sorted)


def sample(logits, seeds, step, temperature=1.0, top_k=0, top_p=1.0, uncond_logits=None, cfg_scale=1.0,
           vocab_range=None):
    """Reference draw: inverse CDF in index order of :func:`sample_support` at ``u = philox_u64(seed,
    step) / 2**64`` (the kernels use exact integer weights, so a draw may differ from this one only
    when ``u`` falls within rounding distance of a CDF step). Returns int64 ``(B,)``."""
    probs = sample_support(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, vocab_range)
    step = int(step)
    out = []
    for b in range(probs.shape[0]):
        if temperature == 0:
            out.append(int(probs[b].argmax()))
            continue
        u = philox_u64(int(seeds[b]), step) / 2.0**64
        cdf = torch.cumsum(probs[b], 0)
        idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device),
                                     right=True))
        idx = min(idx, probs.shape[1] - 1)
        while probs[b, idx] == 0:  # never land on a zero-probability token at the top of the CDF
            idx -= 1
        out.append(idx)
    return torch.tensor(out, dtype=torch.long, device=logits.device)
