"""On-device token sampling: classifier-free guidance, vocab range, temperature, top-k, top-p and a
seeded categorical draw in one op, without a host round trip or a full sort of the vocabulary.

Semantics (csrc/common/sampling.h has the exact definition, dalle_fast.reference.sample_support the
full-sort reference): order tokens by descending guided logit, ties by ascending index; top-k keeps
the first ``top_k``, top-p the shortest prefix whose probability reaches ``top_p``; the draw for row
``b`` uses Philox4x32-10 keyed by ``seeds[b]`` with counter ``step``, so it depends only on
(seeds[b], step, that row's logits): independent of the batch, bit-identical on reruns, identical
on CPU and CUDA, and a CUDA graph that increments ``step`` on the device replays fresh draws.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._checks import KERNEL_DTYPES, int64, number, same_device, tensor
from ._backend import OPS, resolve_backend, select

__all__ = ["sample", "check_error_flags"]

SAMPLE_BACKENDS = tuple(OPS["sample"].kernels)


@torch.library.register_fake("dalle_fast::sample")
def _sample_fake(logits, seeds, step, uncond_logits, cfg_scale, temperature, top_k, top_p, vocab_lo, vocab_hi):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b,), dtype=torch.int32)


def _resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend a sample call on ``device`` uses (before checking it can serve it)."""
    return resolve_backend(backend, device, op="sample")


def _check_reference(logits, seeds, step, temperature, top_k, top_p, uncond_logits, cfg_scale, lo, hi):
    """ValueError naming the argument unless the (coerced) arguments make a sample call: the
    reference backend's checks, those of the C++ op (csrc/decode_checks.h) in Python."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be a (batch, vocab) tensor with vocab >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in KERNEL_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    B, V = logits.shape
    dev = logits.device
    if seeds.dtype != torch.int64 or seeds.shape != (B,):
        raise ValueError(f"seeds must be an int64 tensor of shape ({B},), got {seeds.dtype} {tuple(seeds.shape)}")
    if seeds.device != dev:
        raise ValueError(f"seeds must be on logits' device {dev}, got {seeds.device}")
    if step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError(f"step must be a one-element int64 tensor, got {step.dtype} {tuple(step.shape)}")
    if step.device != dev:
        raise ValueError(f"step must be on logits' device {dev}, got {step.device}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cfg_scale != cfg_scale or abs(cfg_scale) == float("inf"):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    if uncond_logits is not None and (uncond_logits.shape != logits.shape or uncond_logits.dtype != logits.dtype
                                      or uncond_logits.device != dev):
        raise ValueError("uncond_logits must be a tensor with logits' shape, dtype and device")
    if not 0 <= lo < hi <= V:
        raise ValueError(f"vocab_range must be ints with 0 <= lo < hi <= vocab = {V}, got {(lo, hi)!r}")


def sample(logits: torch.Tensor, *, seeds: torch.Tensor, step, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, uncond_logits: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
           vocab_range: Optional[Tuple[int, int]] = None, return_error_flag: bool = False,
           backend: Optional[str] = None):
    """Draw one token per row.

    Args:
        logits: ``(B, V)`` float32/bfloat16/float16/float64 (computed in float32).
        seeds: int64 ``(B,)`` on logits' device, one seed per row.
        step: int64 one-element tensor on logits' device (or an int): the draw counter.
        temperature: >= 0; 0 is greedy (argmax, lowest index on ties).
        top_k: keep the ``top_k`` largest (0, or ``top_k >= V``: all).
        top_p: in (0, 1]; keep the smallest prefix with probability >= top_p (1: all).
        uncond_logits: optional ``(B, V)``; the guided logit is ``uncond + cfg_scale * (logits -
            uncond)`` (a token -inf in either stays -inf).
        cfg_scale: guidance scale (used with ``uncond_logits``).
        vocab_range: ``(lo, hi)``: only tokens ``lo <= t < hi`` can be drawn (e.g. the image tokens).
        return_error_flag: also return the int32 ``(B,)`` flag tensor (0 ok, 1 NaN/+inf in the row,
            2 every logit -inf). The CPU kernel raises on such rows instead; the CUDA kernel sets the
            flag on the device (no host sync) and returns token ``lo`` for the row.
        backend: ``reference``, ``cpu`` or ``cuda``; default by device.

    Returns:
        int64 ``(B,)`` tokens (and the flag when ``return_error_flag``).
    """
    # coerce and choose a backend; the C++ op checks its arguments (csrc/decode_checks.h), the
    # reference backend with _check_reference
    logits, seeds = tensor("logits", logits), tensor("seeds", seeds)
    uncond_logits = tensor("uncond_logits", uncond_logits, optional=True)
    if isinstance(step, bool):
        raise ValueError("step must be an int64 tensor or an int, got bool")
    if isinstance(step, int):
        step = torch.tensor(int64("step", step), dtype=torch.int64, device=logits.device)
    step = tensor("step", step)
    same_device("logits", (("logits", logits), ("seeds", seeds), ("step", step), ("uncond_logits", uncond_logits)))
    temperature, top_p = number("temperature", temperature), number("top_p", top_p)
    cfg_scale = number("cfg_scale", cfg_scale)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    V = logits.shape[-1] if logits.dim() else 0
    top_k = int64("top_k", min(top_k, V) if top_k >= 0 else top_k)  # keeping V tokens keeps all
    if vocab_range is None:
        vocab_range = (0, V)
    try:
        lo, hi = vocab_range
    except (TypeError, ValueError):
        raise ValueError(f"vocab_range must be a pair (lo, hi), got {vocab_range!r}") from None
    lo, hi = int64("vocab_range", lo), int64("vocab_range", hi)
    if logits.dtype == torch.float64:  # the kernels compute in float32
        logits = logits.float()
        if uncond_logits is not None and uncond_logits.dtype == torch.float64:
            uncond_logits = uncond_logits.float()
    name = select("sample", backend, logits.device, logits.dtype, arg="logits")
    if name == "reference":
        _check_reference(logits, seeds, step, temperature, top_k, top_p, uncond_logits, cfg_scale, lo, hi)
        tokens = reference.sample(logits, seeds, int(step), temperature, top_k, top_p, uncond_logits, cfg_scale,
                                  (lo, hi))
        flag = torch.zeros(logits.shape[0], dtype=torch.int32, device=logits.device)
    else:
        tokens, flag = torch.ops.dalle_fast.sample(logits, seeds, step, uncond_logits, cfg_scale, temperature,
                                                   top_k, top_p, lo, hi)
    return (tokens, flag) if return_error_flag else tokens


def check_error_flags(errors: torch.Tensor, who: str) -> None:
    """RuntimeError, as the CPU kernel raises at the draw, if any row of ``errors`` is flagged:
    the flags of :func:`sample` (``return_error_flag``) OR-ed over a run of draws on the device
    (1: NaN/+inf logits, 2: every logit -inf; the CUDA kernel then draws the lowest token of the
    range). For loops that draw many tokens without a host sync: one sync here, at the end."""
    bad = errors.nonzero().flatten().tolist()
    if bad:
        flags = set(errors[bad].tolist())
        what = " or ".join(w for bit, w in ((1, "NaN or +inf"), (2, "all -inf")) if any(f & bit for f in flags))
        raise RuntimeError(f"{who}: the image logits (or their guided mix) were {what} in {len(bad)} of "
                           f"{errors.numel()} rows (first: row {bad[0]}); their tokens are not samples")
