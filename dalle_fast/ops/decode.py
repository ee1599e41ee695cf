"""KV-cached decode attention: one query per row against a static cache, reading only the keys its
layout allows.

Cache layout (per layer):

* Plain: ``k_cache``/``v_cache`` ``(B, H, L, D)``, position ``p`` of row ``b`` at ``[b, :, p]``.
* Best-of-N sharing: the N candidates of a prompt share one copy of the prompt's text keys/values,
  ``text_k_cache``/``text_v_cache`` ``(P, H, >= T, D)`` (``P`` prompts, filled by prefill), and
  ``prompt_index`` int64 ``(B,)`` maps each row to its prompt. The per-row caches then hold the
  image part only: position ``p >= T`` of row ``b`` at ``[b, :, p - T]`` (``L >= S*S``), so a
  candidate costs ``(S*S) * H * D`` cache entries instead of ``(T + S*S) * H * D``, and only image
  positions are decoded. The kernels read a prompt's text rows from the same addresses for all its
  candidates, with the candidates of one prompt scheduled next to each other (CUDA: adjacent thread
  blocks of one head and key split; CPU: consecutive work items of a thread), so from DRAM the text
  part is read about once per prompt and an extra candidate costs only its image keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from .._checks import check_scale, number, same_device, tensor
from ..masks import Layout
from ._backend import OPS, require, resolve_backend

__all__ = ["decode_attention"]

DECODE_BACKENDS = tuple(OPS["decode_attention"].kernels)


@torch.library.register_fake("dalle_fast::decode_attention")
def _decode_attention_fake(q, k_new, v_new, k_cache, v_cache, pos, text_k_cache, text_v_cache, prompt_index,
                           kind, text_len, image_size, kernel_size, dilation, scale):
    return q.new_empty(q.shape)


def _resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend a decode_attention call on ``device`` uses (before checking it can serve it)."""
    return resolve_backend(backend, device, op="decode_attention")


def _check_reference(q, k_new, v_new, k_cache, v_cache, pos, layout, text_k_cache, text_v_cache, prompt_index):
    """ValueError naming the argument unless the arguments make a decode_attention call (pos and
    prompt_index values too, where they are on the CPU and not under torch.compile): the reference
    backend's checks, those of the C++ op (csrc/decode_checks.h) in Python."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (batch, heads, 1, head_dim), got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    B, H, _, D = q.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[1] != H or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be ({B}, {H}, cache_len, {D}), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):  # written in place
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} is written in place and must not be expanded (stride 0 in a dim of size > 1), "
                             f"got strides {t.stride()}")
    if pos.dtype != torch.int64:
        raise ValueError(f"pos must be an int64 tensor, got {pos.dtype}")
    if pos.device != q.device:
        raise ValueError(f"pos must be on q's device {q.device}, got {pos.device}")
    if not (pos.dim() == 0 or (pos.dim() == 1 and pos.shape[0] == B)):
        raise ValueError(f"pos must be 0-dim or (batch,) = ({B},), got shape {tuple(pos.shape)}")
    shared = text_k_cache is not None
    if (text_v_cache is not None) != shared or (prompt_index is not None) != shared:
        raise ValueError("text_k_cache, text_v_cache and prompt_index must be given together")
    T = layout.text_len
    if shared:
        for name, t in (("text_k_cache", text_k_cache), ("text_v_cache", text_v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != H or t.shape[2] < T or t.shape[3] != D:
                raise ValueError(f"{name} must be (prompts, {H}, >= text_len = {T}, {D}), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                                 f"({t.dtype}, {t.device})")
        if text_v_cache.shape != text_k_cache.shape:
            raise ValueError(f"text_v_cache must have text_k_cache's shape {tuple(text_k_cache.shape)}, got "
                             f"{tuple(text_v_cache.shape)}")
        if (not isinstance(prompt_index, torch.Tensor) or prompt_index.dtype != torch.int64
                or prompt_index.shape != (B,) or prompt_index.device != q.device):
            raise ValueError(f"prompt_index must be an int64 ({B},) tensor on {q.device}")
    offset = T if shared else 0
    # value checks need the host: CPU tensors in eager mode (the C++ CPU kernel checks again when
    # compiled); CUDA kernels guard on the device
    eager = not torch.compiler.is_compiling()
    if pos.device.type == "cpu" and eager and pos.numel():
        lo, hi = int(pos.min()), int(pos.max())
        if lo < offset or hi >= layout.seq_len:
            raise ValueError(f"pos must be in [{offset}, {layout.seq_len}) for {layout}"
                             + (" with shared text caches (image positions only)" if shared else "")
                             + f", got values in [{lo}, {hi}]")
        if hi - offset >= k_cache.shape[2]:
            raise ValueError(f"k_cache is too short: pos {hi} needs cache_len > {hi - offset}, got "
                             f"{k_cache.shape[2]}")
    if shared and eager and prompt_index.device.type == "cpu" and prompt_index.numel():
        if int(prompt_index.min()) < 0 or int(prompt_index.max()) >= text_k_cache.shape[0]:
            raise ValueError(f"prompt_index values must be in [0, {text_k_cache.shape[0]})")


def decode_attention(q, k_new, v_new, k_cache, v_cache, pos, layout: Layout, *, scale: Optional[float] = None,
                     text_k_cache=None, text_v_cache=None, prompt_index=None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """One KV-cached decode step of a layer with layout ``layout``.

    Writes ``k_new``/``v_new`` into ``k_cache``/``v_cache`` at ``pos`` **in place**, then attends with
    ``q`` over exactly the keys ``layout`` allows position ``pos`` (text keys, then the kind's image
    pattern; ``layout.decode_keys``). Equals the last row of ``sparse_attention`` over the prefix.

    Args:
        q, k_new, v_new: ``(B, H, 1, D)``.
        k_cache, v_cache: ``(B, H, L, D)`` static caches (last dim contiguous); see the module doc for
            the shared-text layout where they hold image positions only.
        pos: int64 tensor ``(B,)`` (rows may be at different positions) or 0-dim, on q's device.
            CPU: values are checked (ValueError). CUDA: checked on the device without a host sync; a
            row whose pos (or prompt_index) is out of range gets NaN output and its cache is untouched.
        layout: the layer's :class:`dalle_fast.Layout`.
        scale: softmax scale, default ``1/sqrt(D)``.
        text_k_cache, text_v_cache: optional ``(P, H, >= T, D)`` shared text caches (best-of-N).
        prompt_index: int64 ``(B,)`` row -> prompt, with the shared caches.
        backend: ``reference``, ``cpu`` (CPU tensors; float32/bfloat16/float16, any D) or ``cuda``
            (CUDA tensors; float32/bfloat16/float16, D in 32/64/128); default by device. The cpu and
            cuda kernels are inference-only: with grad mode on, an input that requires grad is a
            ValueError.

    Returns:
        ``(B, H, 1, D)`` in q's dtype.
    """
    # coerce and choose a backend; the C++ op checks its arguments (csrc/decode_checks.h), the
    # reference backend with _check_reference
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a dalle_fast.Layout, got {type(layout).__name__}")
    q, k_new, v_new, k_cache, v_cache, pos = (tensor(n, t) for n, t in (
        ("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache), ("pos", pos)))
    text_k_cache, text_v_cache, prompt_index = (tensor(n, t, optional=True) for n, t in (
        ("text_k_cache", text_k_cache), ("text_v_cache", text_v_cache), ("prompt_index", prompt_index)))
    same_device("q", (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache),
                      ("pos", pos), ("text_k_cache", text_k_cache), ("text_v_cache", text_v_cache),
                      ("prompt_index", prompt_index)))
    head_dim = q.shape[-1] if q.dim() else None
    scale = 1.0 / math.sqrt(max(head_dim or 1, 1)) if scale is None else number("scale", scale)
    name = _resolve(backend, q.device)
    if name != "reference" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k_new, v_new, k_cache, v_cache, text_k_cache, text_v_cache)):
        # the fused decode kernels have no backward: gradients would silently be missing
        raise ValueError(f"backend {name!r} of decode_attention is inference-only and an input requires grad; "
                         "call it under torch.no_grad() (or use backend='reference' to differentiate)")
    require("decode_attention", (name,), q.device, q.dtype, head_dim)
    if name == "reference":
        _check_reference(q, k_new, v_new, k_cache, v_cache, pos, layout, text_k_cache, text_v_cache, prompt_index)
        check_scale(scale)
        return reference.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, layout, scale,
                                          text_k_cache, text_v_cache, prompt_index)
    return torch.ops.dalle_fast.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, text_k_cache,
                                                 text_v_cache, prompt_index, *layout.params(), scale)
