"""Drop-in adapter for DALLE-pytorch (PyPI ``dalle-pytorch``, module ``dalle_pytorch``, tested with 1.6.6).

    import dalle_fast.integrations.dalle_pytorch as dfp

    dfp.patch(model)                           # same weights, dalle_fast.sparse_attention inside
    loss = model(text, image, return_loss=True)  # training and forward as before, faster
    codes = dfp.generate(model, text, filter_thres=0.9, cond_scale=3.0)   # (B, image_seq_len)
    images = model.vae.decode(codes)
    dfp.unpatch(model)                         # the original modules are back

**patch** replaces the attention module inside every layer of a ``dalle_pytorch.DALLE``
(``Attention``, ``SparseAxialCausalAttention``, ``SparseConvCausalAttention``) by a
:class:`DallePytorchAttention` that holds the *same* ``to_qkv``/``to_out`` modules (same parameters,
same ``state_dict`` keys, so optimizers and checkpoints keep working) and computes the layer's mask
with :func:`dalle_fast.sparse_attention`. The layer kinds map to :class:`dalle_fast.Layout` kinds:

    ==================================  ==============================================
    DALLE-pytorch attention type        Layout (T = text_seq_len + 1, S = fmap size)
    ==================================  ==============================================
    ``full``                            ``Layout("full", T, S)``
    ``axial_row``                       ``Layout("axial_row", T, S)``
    ``axial_col``                       ``Layout("axial_col", T, S)``
    ``conv_like`` (kernel K, dilation d)  ``Layout("conv_like", T, S, K, d)``
    ``axial_*`` with optimize_for_inference  the same kinds (static mask recognised)
    ==================================  ==============================================

Everything around attention (token shift, rotary embeddings, LayerScale, pre/sandwich norms,
feed-forward, ``stable``) is the package's own code and runs unchanged. ``attn_dropout`` is, in
DALLE-pytorch 1.6.6, an ``nn.Dropout`` after the attention's output projection (not on the attention
probabilities); the patched layers run that same module on a tensor of the shape DALLE-pytorch gives it
(the axial and conv layers project a sequence padded to ``seq_len + 1``), so in training the same seed
zeroes the same entries and outputs match the unpatched model's. The training loss
(``forward(..., return_loss=True)``) is also replaced, when the model's ``DALLE.forward`` is the
source the adapter was written against (dalle-pytorch 1.6.6, checked by hash): it computes only the
logits the loss uses (text columns at text positions, image columns at image positions; the others
are masked to -finfo.max by DALLE-pytorch and carry no probability or gradient), the same loss and
gradients at about half the output-layer cost. It leaves the caller's ``text`` unmodified under
``null_cond_prob`` (DALLE-pytorch zeroes it in place). Other calls run the original ``forward``.

**generate** samples image tokens with dalle_fast's static KV cache: the caption (and, with guidance,
the all-padding caption) is prefilled once with ``sparse_attention``; each image token then runs every
layer for one position with :func:`dalle_fast.decode_attention` (shared text caches, image-only
per-row caches) and :func:`dalle_fast.sample`. DALLE-pytorch's token shift and rotary embeddings are
reproduced exactly in the cached step: each layer keeps the normalised features of the image tokens
it has seen (the token shift reads the token above and the one to the left), and rotary embeddings
are applied at the token's absolute position (to q, k and v, as DALLE-pytorch does). It works on
patched and unpatched models alike.

Sampling semantics follow ``DALLE.generate_images``: ``filter_thres`` keeps the top
``max(int((1 - filter_thres) * total_tokens), 1)`` logits, ``temperature`` divides the logits, and
``cond_scale`` mixes ``null + (cond - null) * cond_scale`` with the null logits from the all-padding
caption. Unlike DALLE-pytorch (whose ``null_cond_prob`` path multiplies the caller's text tensor by
zero in place, so every later step is unconditional), the prompt is never modified. Draws are
seeded per image (``seed + i``) with dalle_fast's counter-based sampler, so they are reproducible but
not the same random numbers as ``torch.rand``; with a top-k of 1 (``filter_thres=1``) generation is
greedy and token-for-token equal to ``generate_images``.

Layers that share modules (``shared_attn_ids``/``shared_ff_ids``) share one stand-in; :func:`generate`
keeps a KV cache and token-shift history per layer position. ``reversible=True`` models are patched
inside their reversible blocks (DALLE-pytorch's own reversible forward and backward run around them)
and :func:`generate` runs the reversible recurrence ``y1 = x1 + f(x2), y2 = x2 + g(y1)``.

Options the adapter cannot reproduce are refused with a ``ValueError`` naming the option: the DeepSpeed
``sparse`` attention type, non-causal attention, a key-padding ``mask`` passed to the attention,
DALLE-pytorch's own inference ``cache`` on a patched model (use :func:`generate`, or :func:`unpatch`
first), and :func:`generate` on a float64 model (its decode kernels take float32/bfloat16/float16; the
patched forward of a float64 model runs dalle_fast's reference attention).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Engine, KVCache, SampleOptions, resolve_compile, resolve_cuda_graph
from ..masks import Layout
from ..nn.functional import vocab_slice_cross_entropy
from ..ops import LinearPack, check_error_flags, pack_module, sample, sparse_attention
from ..ops.branch import AttentionBranch, MlpBranch
from ..ops.linear import step_parts

__all__ = ["DallePytorchAttention", "generate", "generate_images", "import_dalle_pytorch", "is_patched", "layouts",
           "patch", "unpatch"]


def import_dalle_pytorch(stand_ins: bool = False):
    """Import and return the ``dalle_pytorch`` package.

    DALLE-pytorch 1.6.6 imports ``taming`` (its VQGAN), ``omegaconf`` and ``pkg_resources`` at import
    time, though only its VQGAN and pretrained-VAE paths use them; ``pkg_resources`` is gone from
    recent setuptools. With ``stand_ins=True`` each of those that is missing is replaced by an empty
    module for the duration of the import (and removed from ``sys.modules`` afterwards), so the
    transformer, ``DiscreteVAE`` and this adapter work without them. ImportError otherwise.
    """
    import sys
    import types

    added = []

    def stand_in(name, **attrs):
        try:
            __import__(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    sys.modules[sub] = types.ModuleType(sub)
                    added.append(sub)
            for key, value in attrs.items():
                setattr(sys.modules[name], key, value)

    if stand_ins and "dalle_pytorch" not in sys.modules:
        stand_in("pkg_resources", get_distribution=lambda name: types.SimpleNamespace(version="unknown"))
        stand_in("omegaconf", OmegaConf=None)
        stand_in("taming.models.vqgan", VQModel=None, GumbelVQ=None)
    try:
        import dalle_pytorch
        from dalle_pytorch import attention, reversible, transformer  # noqa: F401
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return dalle_pytorch


def _package():
    """(dalle_pytorch, its transformer module, its attention module, its reversible module)."""
    try:
        import dalle_pytorch
        from dalle_pytorch import attention, reversible, transformer
    except ImportError as e:
        raise ImportError("dalle_fast.integrations.dalle_pytorch needs the dalle-pytorch package "
                          f"(pip install dalle-pytorch): {e}") from e
    return dalle_pytorch, transformer, attention, reversible


# ---------------------------------------------------------------------------------------------
# the attention stand-in
# ---------------------------------------------------------------------------------------------
def _project(core: nn.Module, x: torch.Tensor, freqs: Optional[torch.Tensor], to_qkv=None, rotary=None):
    """``x (B, n, dim)`` -> q, k, v ``(B, heads, n, dim_head)`` with DALLE-pytorch's rotary embedding
    ``freqs (1, n, rot)`` applied to all three (as its attention modules do). ``to_qkv``: the packed
    ``core.to_qkv`` of a decode step, or None. ``rotary``: instead of ``freqs``, its ``(cos, sin)``
    tables from :func:`_rotary_tables` at the step's position."""
    b, n, _ = x.shape
    qkv = (core.to_qkv if to_qkv is None else to_qkv)(x).view(b, n, 3, core.heads, -1).permute(2, 0, 3, 1, 4)
    if rotary is not None:
        qkv = _apply_rotary(qkv, *rotary)
    elif freqs is not None:
        from rotary_embedding_torch import apply_rotary_emb  # DALLE-pytorch's own dependency
        qkv = apply_rotary_emb(freqs, qkv)
    return qkv.unbind(0)


def _rotary_tables(freqs: torch.Tensor):
    """``freqs (1, N, rot)`` -> ``(cos, sin)`` tables for :func:`_apply_rotary`, the sine's even
    features negated (rotate_half's sign), computed once per generation instead of per step."""
    sign = torch.ones(freqs.shape[-1], dtype=freqs.dtype, device=freqs.device)
    sign[0::2] = -1
    return freqs.cos(), freqs.sin() * sign


def _apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotary_embedding_torch's ``apply_rotary_emb(freqs, t)`` (start 0, scale 1) from the tables of
    :func:`_rotary_tables`: ``t * cos + rotate_half(t) * sin`` on the first ``rot`` features, where
    rotate_half maps the pairs ``(a, b)`` to ``(-b, a)``; the pair swap with the sign folded into
    ``sin`` gives the same products, so the same bits, in about a third of the ops."""
    rot = cos.shape[-1]
    mid = t[..., :rot]
    swapped = mid.unflatten(-1, (rot // 2, 2)).flip(-1).flatten(-2)
    out = mid * cos + swapped * sin
    if rot < t.shape[-1]:
        out = torch.cat((out, t[..., rot:]), dim=-1)
    return out.to(t.dtype)


def _merge(core: nn.Module, out: torch.Tensor, to_out=None) -> torch.Tensor:
    """``out (B, heads, n, dim_head)`` -> ``to_out`` (or the packed ``to_out`` of a decode step) of the
    heads concatenated, ``(B, n, dim)``."""
    b, h, n, d = out.shape
    return (core.to_out if to_out is None else to_out)(out.transpose(1, 2).reshape(b, n, h * d))


class DallePytorchAttention(nn.Module):
    """Stand-in for one DALLE-pytorch attention module, computed with :func:`dalle_fast.sparse_attention`.

    Holds the original's ``to_qkv`` and ``to_out`` (the same modules, so the same parameters and
    ``state_dict`` keys); the original itself is kept outside the module tree for :func:`unpatch`.

    Shapes: ``x (batch, n, dim) -> (batch, n, dim)`` with ``n <= layout.seq_len - 1`` (DALLE-pytorch
    never feeds the last image token); float32/bfloat16/float16 on CPU (or CUDA with the triton
    backend), float64 through dalle_fast's reference attention. ``rotary_pos_emb`` is the transformer's
    ``(1, >= n, rot)`` buffer, passed by DALLE-pytorch's layer routing.
    """

    def __init__(self, original: nn.Module, layout: Layout):
        super().__init__()
        self.to_qkv, self.to_out = original.to_qkv, original.to_out
        self.heads, self.scale, self.layout = original.heads, float(original.scale), layout
        self.__dict__["original"] = original  # not a submodule: parameters and state_dict keys unchanged
        # DALLE-pytorch's axial and conv modules pad the sequence to seq_len + 1 and run to_out (whose
        # nn.Dropout is the model's attn_dropout) on all of it before cutting back to n: in training the
        # dropout mask is drawn for that padded shape, and so is it here (same seed, same zeroed entries)
        _, _, at, _ = _package()
        padded = isinstance(original, (at.SparseAxialCausalAttention, at.SparseConvCausalAttention))
        self.padded_len = original.seq_len + 1 if padded else None

    def _dropout_active(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.to_out.modules())

    def forward(self, x, mask=None, rotary_pos_emb=None, cache=None, cache_key=None):
        if mask is not None:
            raise ValueError("mask: a key-padding mask is not supported by the dalle_fast attention "
                             "(DALLE-pytorch's DALLE never passes one)")
        if cache is not None:
            raise ValueError("cache: DALLE-pytorch's inference cache (generate_images(use_cache=True)) is not "
                             "supported on a patched model; use dalle_fast.integrations.dalle_pytorch.generate, "
                             "or unpatch(model) first")
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, dim), got shape {tuple(x.shape)}")
        n = x.shape[1]
        q, k, v = _project(self, x, None if rotary_pos_emb is None else rotary_pos_emb[:, :n])
        # float64 (the kernels take float32/bfloat16/float16): dalle_fast's reference attention, same masks
        backend = "reference" if q.dtype == torch.float64 else None
        out = sparse_attention(q, k, v, self.layout, scale=self.scale, backend=backend)
        padded_len = getattr(self, "padded_len", None)  # (absent in stand-ins pickled by earlier versions)
        if padded_len is None or not self._dropout_active():
            return _merge(self, out)
        b, h, _, d = out.shape
        padded = F.pad(out.transpose(1, 2).reshape(b, n, h * d), (0, 0, 0, padded_len - n))
        return self.to_out(padded)[:, :n]

    def extra_repr(self) -> str:
        return f"heads={self.heads}, layout={self.layout}"


# ---------------------------------------------------------------------------------------------
# reading a DALLE-pytorch model (and refusing what cannot be reproduced)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Branch:
    """One residual branch ``x + scale * norm_out(core(shift(norm(x))))`` of a layer."""
    layer_scale: nn.Module
    prenorm: nn.Module
    shift: bool
    parent: nn.Module  # the module whose ``.fn`` is ``core``
    core: nn.Module

    def delta(self, x: torch.Tensor, shift, core) -> torch.Tensor:
        """The branch without its residual: ``scale * norm_out(core(shift(norm(x))))``."""
        h = self.prenorm.norm(x)
        if self.shift:
            h = shift(h)
        return self.prenorm.norm_out(core(h)) * self.layer_scale.scale

    def run(self, x: torch.Tensor, shift, core) -> torch.Tensor:
        return x + self.delta(x, shift, core)


@dataclass
class _Layer:
    attn: _Branch
    ff: _Branch
    layout: Layout


@dataclass
class _Spec:
    layers: List[_Layer]
    text_len: int    # T = text_seq_len + 1 (with <bos>)
    image_size: int  # S
    reversible: bool = False  # ReversibleSequence: y1 = x1 + f(x2), y2 = x2 + g(y1), mean of y1, y2 at the end


def _unwrap(layer_scale: nn.Module, tr, index: int, what: str) -> _Branch:
    prenorm = layer_scale.fn
    if not isinstance(layer_scale, tr.LayerScale) or not isinstance(prenorm, tr.PreNorm):
        raise ValueError(f"model: layer {index} {what} is {type(layer_scale).__name__}, not DALLE-pytorch's "
                         "LayerScale(PreNorm(...)); this model structure is not supported")
    parent, node, shift = prenorm, prenorm.fn, False
    while isinstance(node, (tr.PreShiftToken, tr.CachedAs, tr.NonCached)):
        shift = shift or isinstance(node, tr.PreShiftToken)
        parent, node = node, node.fn
    return _Branch(layer_scale, prenorm, shift, parent, node)


def _attention_layout(core: nn.Module, at, T: int, S: int, index: int) -> Layout:
    if isinstance(core, DallePytorchAttention):
        return core.layout
    if isinstance(core, at.SparseAttention):
        raise ValueError(f"attn_types: layer {index} uses the DeepSpeed 'sparse' attention type, whose random "
                         "block pattern dalle_fast does not reproduce")
    if isinstance(core, at.SparseAxialCausalAttention):
        return Layout("axial_row" if core.axis == 0 else "axial_col", T, S)
    if isinstance(core, at.SparseConvCausalAttention):
        return Layout("conv_like", T, S, kernel_size=core.kernel_size, dilation=core.dilation)
    if isinstance(core, at.Attention):
        if not core.causal:
            raise ValueError(f"causal: layer {index} attention is not causal; dalle_fast masks are causal")
        if core.static_mask is None:
            return Layout("full", T, S)
        n = core.static_mask.shape[-1]
        wanted = core.static_mask.cpu() & Layout("full", T, S).dense_mask(n)
        for kind in ("axial_row", "axial_col", "full"):
            layout = Layout(kind, T, S)
            if torch.equal(layout.dense_mask(n), wanted):
                return layout
        raise ValueError(f"optimize_for_inference: layer {index} has a static mask that is none of dalle_fast's "
                         "layouts")
    raise ValueError(f"attn_types: layer {index} attention {type(core).__name__} is not supported")


def _inspect(model) -> _Spec:
    dp, tr, at, rev = _package()
    if not isinstance(model, dp.DALLE):
        raise ValueError(f"model must be a dalle_pytorch.DALLE, got {type(model).__name__}")
    seq = model.transformer.layers
    reversible = isinstance(seq, rev.ReversibleSequence)
    if reversible:  # its blocks run the same LayerScale(PreNorm(...)) pairs through Deterministic wrappers
        pairs = [(block.f.net, block.g.net) for block in seq.blocks]
    elif isinstance(seq, rev.SequentialSequence):
        pairs = list(seq.layers)
    else:
        raise ValueError(f"model.transformer.layers is {type(seq).__name__}, not a SequentialSequence or "
                         "ReversibleSequence")
    S = model.transformer.image_fmap_size
    T = model.text_seq_len + 1
    layers = []
    for i, (f, g) in enumerate(pairs):
        # (shared_attn_ids / shared_ff_ids: a module may be the core of several layers; each layer still
        # has its own LayerScale, norms and token shift, and generate keeps a KV cache per layer)
        attn, ff = _unwrap(f, tr, i, "attention"), _unwrap(g, tr, i, "feed-forward")
        if not isinstance(ff.core, tr.FeedForward):
            raise ValueError(f"model: layer {i} feed-forward is {type(ff.core).__name__}, not FeedForward")
        for branch in (attn, ff):
            for node in (branch.prenorm.fn, getattr(branch.prenorm.fn, "fn", None)):
                if isinstance(node, tr.PreShiftToken) and (node.image_size != S or node.text_len != T):
                    raise ValueError(f"shift_tokens: layer {i} shifts for image_size={node.image_size}, "
                                     f"text_len={node.text_len}, but the model has {S} and {T}")
        layers.append(_Layer(attn, ff, _attention_layout(attn.core, at, T, S, i)))
    if not (isinstance(model.to_logits, nn.Sequential) and len(model.to_logits) == 2
            and isinstance(model.to_logits[1], nn.Linear)):
        raise ValueError("model.to_logits must be DALLE-pytorch's Sequential(LayerNorm, Linear)")
    return _Spec(layers, T, S, reversible)


# ---------------------------------------------------------------------------------------------
# the training loss without the masked half of the logits
# ---------------------------------------------------------------------------------------------
# DALLE.forward(return_loss=True) computes all text + image logits at every position, fills the
# text-to-image and image-to-text halves with -finfo.max and takes two cross-entropies over
# 'b c n'-rearranged logits. The filled logits get softmax weight exactly 0 and gradient 0, so the
# loss only needs the text columns at text positions and the image columns at image positions: at
# the peer benchmark's shape that halves the largest GEMMs of the step and drops the copies of the
# (B, n, text + image vocab) logits. The replacement below mirrors the DALLE.forward it was written
# against line by line; it is installed only when the model's forward is that source (checked by
# hash), otherwise patch leaves forward alone.
_KNOWN_FORWARD_SHA256 = {
    # dalle-pytorch 1.6.6
    "2d31ba97781c0a4fbf824248c322363fbcc0fa58de57ce4cb6069cb169067a8a",
}


def _forward_source_hash(cls) -> Optional[str]:
    """SHA-256 of the source of ``cls.forward``; None when the source cannot be read (e.g. a subclass
    defined in an ``exec``/``python -c`` string), which no known hash matches."""
    import hashlib
    import inspect
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()


def _has_loss_forward(model) -> bool:
    """Whether :func:`patch` installed :func:`_loss_forward` as ``model.forward``."""
    forward = model.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _loss_forward


def _loss_forward(self, text, image=None, return_loss=False, null_cond_prob=0., cache=None):
    """DALLE.forward with the loss computed on the unmasked logits only (same value and gradients).
    Calls without ``return_loss`` (or with a cache) go to the original forward."""
    if not return_loss or cache is not None or image is None:
        return type(self).forward(self, text, image, return_loss=return_loss, null_cond_prob=null_cond_prob,
                                  cache=cache)
    if text.shape[-1] != self.text_seq_len:
        raise ValueError(f"text: the length {text.shape[-1]} of the text tokens you passed in does not have the "
                         f"correct length ({self.text_seq_len})")
    batch, device = text.shape[0], text.device
    if null_cond_prob > 0:  # DALLE-pytorch multiplies the caller's tensor in place; this does not
        null_mask = torch.zeros((batch,), device=device).float().uniform_(0, 1) < null_cond_prob
        text = text * (~null_mask)[:, None]
    V, T = self.num_text_tokens, self.text_seq_len
    text_range = torch.arange(T, device=device) + (V - T)
    text = torch.where(text == 0, text_range, text)
    text = F.pad(text, (1, 0), value=0)  # <bos>
    tokens = self.text_emb(text)
    tokens = tokens + self.text_pos_emb(torch.arange(text.shape[1], device=device))
    if image.dim() == 4:
        size, channels = self.vae.image_size, self.vae.channels
        if tuple(image.shape[1:]) != (channels, size, size):
            raise ValueError(f"image: invalid image of dimensions {tuple(image.shape)} passed in during training")
        image = self.vae.get_codebook_indices(image)
    image_emb = self.image_emb(image)
    image_emb = image_emb + self.image_pos_emb(image_emb)
    tokens = torch.cat((tokens, image_emb), dim=1)
    if tokens.shape[1] > self.total_seq_len:
        tokens = tokens[:, :-1]
    if self.stable:
        alpha = 0.1
        tokens = tokens * alpha + tokens.detach() * (1 - alpha)
    out = self.transformer(tokens, cache=None)
    if self.stable:
        out = self.norm_by_max(out)
    h, head = self.to_logits[0](out), self.to_logits[1]
    loss_text = vocab_slice_cross_entropy(h[:, :T], head, 0, V, text[:, 1:])
    loss_img = vocab_slice_cross_entropy(h[:, T:], head, V, head.out_features, image)
    loss = (loss_text + self.loss_img_weight * loss_img) / (self.loss_img_weight + 1)
    return loss.to(h.dtype)  # (float32 inside; the model's dtype out, as F.cross_entropy returns it)


def layouts(model) -> List[Layout]:
    """The :class:`dalle_fast.Layout` of each layer of a ``dalle_pytorch.DALLE`` (ValueError if unsupported)."""
    return [layer.layout for layer in _inspect(model).layers]


def patch(model):
    """Swap every attention module of a ``dalle_pytorch.DALLE`` for a :class:`DallePytorchAttention`
    (same parameters, masks as dalle_fast layouts) in place; returns ``model``. Patching twice is a
    no-op. Raises ValueError naming the option for models the adapter cannot reproduce."""
    replaced = {}  # id(original) -> its stand-in: layers that share a module share the stand-in
    for layer in _inspect(model).layers:
        branch = layer.attn
        if not isinstance(branch.core, DallePytorchAttention):
            if id(branch.core) not in replaced:
                replaced[id(branch.core)] = DallePytorchAttention(branch.core, layer.layout)
            branch.parent.fn = replaced[id(branch.core)]
    if _forward_source_hash(type(model)) in _KNOWN_FORWARD_SHA256:
        # a partial of a module-level function, not a bound method: a bound method pickles as
        # getattr(model, '_loss_forward'), so torch.save(model) could not be loaded back
        model.forward = functools.partial(_loss_forward, model)
    return model


def unpatch(model):
    """Restore the original attention modules (the same objects :func:`patch` replaced); returns ``model``."""
    for module in model.modules():
        core = getattr(module, "fn", None)
        if isinstance(core, DallePytorchAttention):
            original = core.original
            mask = getattr(original, "static_mask", None)
            if mask is not None:  # the model may have moved since patch (parameters are shared, buffers not)
                original.static_mask = mask.to(core.to_qkv.weight.device)
            module.fn = original
    if _has_loss_forward(model):
        del model.forward
    return model


def is_patched(model) -> bool:
    """Whether any attention module of ``model`` is a :class:`DallePytorchAttention`."""
    return any(isinstance(m, DallePytorchAttention) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# cached generation
# ---------------------------------------------------------------------------------------------
def _split_sizes(dim: int, chunks: int) -> List[int]:
    """Feature sizes of ``torch.chunk(dim, chunks)`` (the token shift's split)."""
    return [t.shape[-1] for t in torch.empty(0, dim).chunk(chunks, dim=-1)]


class _StepModel:
    """The step API of :mod:`dalle_fast.engine` for a ``dalle_pytorch.DALLE``: what differs from the
    native model is here (its embeddings, rotary embeddings on q/k/v, token shift, LayerScale and
    norms, the head's image columns in float32); the caches and the loop are the engine's."""

    def __init__(self, model, spec: _Spec):
        self.model, self.spec = model, spec
        self.freqs = model.transformer.pos_emb  # (1, T + S*S, rot) or None
        self.rotary = None if self.freqs is None else _rotary_tables(self.freqs)
        p = next(model.parameters())
        dim = model.to_logits[0].normalized_shape[0]
        self.dim, self.device, self.dtype = dim, p.device, p.dtype
        self.half = _split_sizes(dim, 2)[0]
        self.top, self.left = _split_sizes(dim, 4)[:2]
        S2 = spec.image_size ** 2
        self.history = self.caches = self.packs = self.branches = None
        head = model.to_logits[1]
        n_text = model.num_text_tokens
        self.head_w, self.head_b = head.weight[n_text:], None if head.bias is None else head.bias[n_text:]
        pos = model.image_pos_emb(torch.zeros(1, S2, dim, device=self.device, dtype=self.dtype))
        self.image_pos = pos if isinstance(pos, torch.Tensor) else None  # (1, S*S, dim) without rotary

    def setup_caches(self, prompt_index: torch.Tensor, *, dense: bool = False) -> None:
        if dense:
            raise ValueError("dense: the DALLE-pytorch adapter decodes with the sparse caches only")
        rows, S2 = prompt_index.numel(), self.spec.image_size ** 2
        self.caches = [KVCache(prompt_index, self.spec.text_len, S2) for _ in self.spec.layers]
        # per layer and branch: the (top, left) features of every image token seen, for the token shift
        self.history = [[torch.zeros(rows, S2, self.top + self.left, device=self.device, dtype=self.dtype)
                         if branch.shift else None for branch in (layer.attn, layer.ff)]
                        for layer in self.spec.layers]
        # the decode step's linear layers on packed weights (CPU, float32): per layer to_qkv, to_out and
        # the feed-forward net, then the head's image columns
        self.packs = None
        if LinearPack.serves(self.device, self.dtype):
            made = {}  # shared layers (shared_attn_ids / shared_ff_ids) share their packs

            def pack(module):
                if id(module) not in made:
                    made[id(module)] = pack_module(module)
                return made[id(module)]

            self.packs = ([(pack(layer.attn.core.to_qkv), pack(layer.attn.core.to_out), pack(layer.ff.core.net))
                           for layer in self.spec.layers], LinearPack(self.head_w, self.head_b))
        self.branches = self._branches() if AttentionBranch.serves(self.device, self.dtype) else None

    def _branches(self):
        """Per layer the (attention, feed-forward) branch ops of the eager step (:mod:`dalle_fast.ops.branch`)
        on the packs (or, without packs, the modules' linear layers), or None where a part is not what
        they compute (then the step runs the modules)."""
        _, tr, _, _ = _package()
        out = []
        for i, layer in enumerate(self.spec.layers):
            core = layer.attn.core
            to_qkv, to_out, net = self.packs[0][i] if self.packs is not None else (core.to_qkv, core.to_out,
                                                                                 layer.ff.core.net)
            qkv_parts, out_parts, parts = step_parts(to_qkv), step_parts(to_out), step_parts(net)
            linear = (LinearPack, nn.Linear)
            if not (len(qkv_parts) == 1 and isinstance(qkv_parts[0], linear) and len(out_parts) == 1
                    and isinstance(out_parts[0], linear) and len(parts) == 3 and isinstance(parts[0], linear)
                    and type(parts[1]) is tr.GEGLU and isinstance(parts[2], linear)):
                return None
            to_qkv, to_out = qkv_parts[0], out_parts[0]
            ends = []
            for j, branch in enumerate((layer.attn, layer.ff)):
                norm_out = branch.prenorm.norm_out
                ends.append(dict(dim=self.dim, norm=branch.prenorm.norm,
                                 norm_out=None if isinstance(norm_out, nn.Identity) else norm_out,
                                 layer_scale=branch.layer_scale.scale,
                                 shift=(self.history[i][j], self.top, self.left) if branch.shift else None))
            try:
                out.append((AttentionBranch(**ends[0], to_qkv=to_qkv, heads=core.heads,
                                            rotary=None if self.rotary is None else tuple(r[0] for r in self.rotary),
                                            cache=self.caches[i], layout=layer.layout, scale=core.scale, to_out=to_out),
                            MlpBranch(**ends[1], w1=parts[0], w2=parts[2], geglu=True, text_len=self.spec.text_len,
                                      image_size=self.spec.image_size)))
            except ValueError:
                return None
        return out

    def clear_caches(self) -> None:
        self.history = self.caches = self.packs = self.branches = None

    def image_logits(self, h: torch.Tensor, head=None) -> torch.Tensor:
        """Last hidden state ``(rows, dim)`` -> image-token logits ``(rows, num_image_tokens)`` float32
        (``head``: the packed image columns of a decode step, or None)."""
        if self.model.stable:
            h = self.model.norm_by_max(h)
        h = self.model.to_logits[0](h)
        return (F.linear(h, self.head_w, self.head_b) if head is None else head(h)).float()

    def _run(self, x, shift, attend, ff=None):
        """The layers over ``x``; ``ff(i, h)``: layer ``i``'s feed-forward (default: its module)."""
        ff = ff or (lambda i, h: self.spec.layers[i].ff.core(h))
        if self.spec.reversible:  # DALLE-pytorch's ReversibleSequence (its forward, as in eval)
            x1 = x2 = x
            for i, layer in enumerate(self.spec.layers):
                x1 = x1 + layer.attn.delta(x2, lambda h: shift(i, 0, h), lambda h: attend(i, h))
                x2 = x2 + layer.ff.delta(x1, lambda h: shift(i, 1, h), lambda h: ff(i, h))
            return torch.stack((x1, x2)).mean(dim=0)
        for i, layer in enumerate(self.spec.layers):
            x = layer.attn.run(x, lambda h: shift(i, 0, h), lambda h: attend(i, h))
            x = layer.ff.run(x, lambda h: shift(i, 1, h), lambda h: ff(i, h))
        return x

    # -- prefill: the prompts' text, once per prompt
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (P, T)`` (with <bos> and padding ids) -> image logits ``(P, V)`` of the last text position."""
        model, T = self.model, self.spec.text_len
        x = model.text_emb(ids) + model.text_pos_emb(torch.arange(T, device=ids.device))
        freqs = None if self.freqs is None else self.freqs[:, :T]

        def shift(i, j, h):  # text: the first half of the features comes from the previous token
            prev = F.pad(h[:, :-1, :self.half], (0, 0, 1, 0))
            return torch.cat((prev, h[..., self.half:]), dim=-1)

        def attend(i, h):
            core = self.spec.layers[i].attn.core
            q, k, v = _project(core, h, freqs)
            return _merge(core, self.caches[i].prefill(q, k, v, self.spec.layers[i].layout, scale=core.scale))

        return self.image_logits(self._run(x, shift, attend)[:, -1])

    # -- one image token per row
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        """Feed image token ``m = pos - T`` of every row (``tokens (rows,)``) -> image logits ``(rows, V)``
        of code ``m + 1``. The token shift, image position and rotary embeddings slice at the host
        position ``index``; with ``index=None`` (the compiled step) they index with ``pos`` on the
        device instead, so one graph serves every position."""
        model, T, S = self.model, self.spec.text_len, self.spec.image_size
        top, left = self.top, self.left
        x = model.image_emb(tokens)[:, None]
        if index is not None:
            m = index - T
            image_pos = None if self.image_pos is None else self.image_pos[:, m:m + 1]
            rotary = None if self.rotary is None else tuple(r[:, index:index + 1] for r in self.rotary)

            def shift(i, j, h):  # image: a quarter from the token above, a quarter from the token to the left
                hist = self.history[i][j]
                hist[:, m] = h[:, 0, :top + left]
                above = hist[:, m - S, :top] if m >= S else h.new_zeros(h.shape[0], top)
                before = hist[:, m - 1, top:top + left] if m % S else h.new_zeros(h.shape[0], left)
                return torch.cat((above, before, h[:, 0, top + left:]), dim=-1)[:, None]
        else:
            m = (pos - T).reshape(1)  # (1,) int64 on the device
            image_pos = None if self.image_pos is None else self.image_pos.index_select(1, m)
            rotary = None if self.rotary is None else tuple(r.index_select(1, pos.reshape(1)) for r in self.rotary)
            has_above, has_before = m >= S, m % S != 0  # (1,) bool: the neighbour exists
            above_at, before_at = (m - S).clamp(min=0), (m - 1).clamp(min=0)

            def shift(i, j, h):  # the same, the neighbours gathered and zeroed where absent
                hist = self.history[i][j]
                hist.index_copy_(1, m, h[:, :, :top + left])
                above = torch.where(has_above, hist.index_select(1, above_at)[:, 0, :top], 0)
                before = torch.where(has_before, hist.index_select(1, before_at)[:, 0, top:top + left], 0)
                return torch.cat((above, before, h[:, 0, top + left:]), dim=-1)[:, None]

        if image_pos is not None:
            x = x + image_pos

        packs = self.packs
        if index is not None and self.branches is not None:  # one op per branch (CPU, float32)
            if self.spec.reversible:
                x1 = x2 = x
                for attn, ff in self.branches:
                    x1 = attn(x2, x1, pos)
                    x2 = ff(x1, x2, pos)
                x = torch.stack((x1, x2)).mean(dim=0)
            else:
                for attn, ff in self.branches:
                    x = attn(x, x, pos)
                    x = ff(x, x, pos)
            return self.image_logits(x[:, 0], None if packs is None else packs[1])

        def attend(i, h):
            core, layout = self.spec.layers[i].attn.core, self.spec.layers[i].layout
            to_qkv, to_out = (None, None) if packs is None else packs[0][i][:2]
            q, k, v = _project(core, h, None, to_qkv, rotary)
            return _merge(core, self.caches[i].decode(q, k, v, pos, index, layout, scale=core.scale), to_out)

        if packs is None:
            return self.image_logits(self._run(x, shift, attend)[:, 0])
        h = self._run(x, shift, attend, lambda i, h: packs[0][i][2](h))
        return self.image_logits(h[:, 0], packs[1])


def _text_ids(model, text: torch.Tensor) -> torch.Tensor:
    """DALLE-pytorch's text preprocessing: padding 0 -> unique per-position ids, <bos> (0) prepended."""
    L = model.text_seq_len
    pad = torch.arange(L, device=text.device) + (model.num_text_tokens - L)
    return F.pad(torch.where(text == 0, pad, text), (1, 0), value=0)


@torch.no_grad()
def generate(model, text: torch.Tensor, *, filter_thres: float = 0.5, temperature: float = 1.0,
             cond_scale: float = 1.0, img: Optional[torch.Tensor] = None, num_init_img_tokens: Optional[int] = None,
             seed: Optional[int] = None, compile: Optional[bool] = None,
             cuda_graph: Optional[bool] = None) -> torch.Tensor:
    """Sample image tokens of a ``dalle_pytorch.DALLE`` (patched or not) with dalle_fast's KV cache.

    Args:
        model: a ``dalle_pytorch.DALLE`` on CPU (or CUDA); run in eval mode (restored afterwards).
        text: int64 ``(B, >= text_seq_len)`` caption ids as for ``generate_images`` (0 = padding;
            truncated to ``text_seq_len``), values in ``[0, num_text_tokens)``. Never modified.
        filter_thres: in [0, 1]; keeps the top ``max(int((1 - filter_thres) * model.total_tokens), 1)``
            logits (1 = greedy).
        temperature: >= 0 (0 is greedy).
        cond_scale: classifier-free guidance ``null + (cond - null) * cond_scale`` with the null logits of
            the all-padding caption (``!= 1`` doubles the rows).
        img: optional ``(B, 3, H, W)`` images whose first ``num_init_img_tokens`` codes
            (``model.vae.get_codebook_indices``; default ``int(0.4375 * image_seq_len)``) prime the generation.
        seed: image ``b`` draws with seed ``seed + b`` (reproducible, independent of the batch); ``None``
            (default) takes a fresh seed from torch's global generator on each call, so repeated calls give
            new samples and ``torch.manual_seed`` makes them reproducible.
        compile: run each decode step as one ``torch.compile``-d graph (CPU only; the same codes as
            the eager step). ``None`` (default): the eager step until this process has decoded the model
            eagerly with the same rows, options and length for ``$DALLE_FAST_COMPILE_AFTER`` seconds
            (default 30, about a compile's cost), then the compiled step (falling back to the eager one
            with a ``CompileFallbackWarning`` if it cannot be compiled): one generation never waits for
            a compile, repeated ones get the compiled step (bench/RESULTS.md). ``True``: compile at
            once; a step that cannot be compiled raises RuntimeError. ``False``: always eager.
        cuda_graph: capture the decode step (every layer, guidance and sampling) once in a CUDA graph
            and replay it for every image token (default: on CUDA, unless ``$DALLE_FAST_BACKEND=reference``
            puts the decode ops on the host-syncing reference backend); the same codes as without.

    Returns:
        int64 ``(B, image_seq_len)`` image tokens on the model's device; ``model.vae.decode(codes)`` gives
        the images.
    """
    spec = _inspect(model)
    p = next(model.parameters())
    device = p.device
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"model: a {str(p.dtype).replace('torch.', '')} model cannot generate with dalle_fast's "
                         "cached decode, whose kernels take float32, bfloat16 and float16; convert the model "
                         "(model.float()) or use its own generate_images")
    use_compile = resolve_compile(compile, device, default=True)
    use_graph = resolve_cuda_graph(cuda_graph, device)
    L, S2 = model.text_seq_len, model.image_seq_len
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"text must be an int64 (batch, text_seq_len) tensor, got "
                         f"{(text.dtype, tuple(text.shape)) if isinstance(text, torch.Tensor) else type(text).__name__}")
    if text.shape[1] < L:
        raise ValueError(f"text must have at least text_seq_len = {L} columns, got {text.shape[1]}")
    text = text[:, :L].to(device=device, dtype=torch.int64)  # a copy is made below; the caller's tensor stays
    if text.numel() and (int(text.min()) < 0 or int(text.max()) >= model.num_text_tokens):
        raise ValueError(f"text ids must be in [0, num_text_tokens = {model.num_text_tokens})")
    for name, value in (("filter_thres", filter_thres), ("temperature", temperature), ("cond_scale", cond_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= filter_thres <= 1.0:
        raise ValueError(f"filter_thres must be in [0, 1], got {filter_thres}")
    if seed is None:  # below 2**62: seed + b stays clear of int64's wrap-around
        seed = int(torch.randint(-2**62, 2**62, ()))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -2**63 <= seed < 2**63:  # (seed + b wraps around in int64)
        raise ValueError(f"seed must be an int64, in [-2**63, 2**63), got {seed}")
    B = text.shape[0]
    if B == 0:
        raise ValueError("text must hold at least one caption, got a batch of 0")
    primed = None
    if img is not None:
        n = int(0.4375 * S2) if num_init_img_tokens is None else num_init_img_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < S2:
            raise ValueError(f"num_init_img_tokens must be an int in [0, {S2}), got {n!r}")
        size, channels = getattr(model.vae, "image_size", None), getattr(model.vae, "channels", 3)
        if (not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[0] != B or img.shape[1] != channels
                or (size is not None and tuple(img.shape[2:]) != (size, size))):
            raise ValueError(f"img must be a (batch = {B}, {channels}, {size or 'height'}, {size or 'width'}) tensor, "
                             f"got {tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        primed = model.vae.get_codebook_indices(img.to(device))[:, :n]
    elif num_init_img_tokens is not None:
        raise ValueError("num_init_img_tokens needs img")
    k = max(int((1 - filter_thres) * model.total_tokens), 1)
    top_k = k if k < model.num_image_tokens else 0  # DALLE-pytorch's top-k runs over text + image logits,
    guided = float(cond_scale) != 1.0                # whose text part is masked: at most the image vocabulary
    seeds = torch.arange(B, dtype=torch.int64, device=device) + seed

    was_training = model.training
    model.eval()
    try:
        ids = _text_ids(model, text)
        if guided:  # one null prompt shared by all unconditional rows
            ids = torch.cat((ids, _text_ids(model, torch.zeros_like(text[:1]))))
        opts = SampleOptions(float(cond_scale), float(temperature), top_k, 1.0)
        engine = Engine(_StepModel(model, spec), ids, 1, text_len=spec.text_len, seeds=seeds, opts=opts,
                        guided=guided, sample=sample)
        try:  # primed tokens are copied, not drawn
            codes = engine.decode(S2, primed, skip_primed_draws=True, compile=use_compile, cuda_graph=use_graph,
                                  owner=model)
        finally:
            engine.close()
    finally:
        model.train(was_training)
    check_error_flags(engine.errors, "dalle_pytorch.generate")
    return codes


def generate_images(model, text: torch.Tensor, *, clip=None, **kwargs):
    """``model.generate_images`` of DALLE-pytorch through :func:`generate`: the images
    ``model.vae.decode(codes)``, and with ``clip`` (a ``dalle_pytorch.CLIP``, or any callable
    ``clip(text, images, return_loss=False)``) also its scores of each caption and image,
    ``(images, scores)``, as DALLE-pytorch returns them. ``kwargs``: those of :func:`generate`."""
    codes = generate(model, text, **kwargs)
    with torch.no_grad():
        images = model.vae.decode(codes)
        if clip is None:
            return images
        caption = text[:, :model.text_seq_len].to(device=images.device, dtype=torch.int64)
        return images, clip(caption, images, return_loss=False)
