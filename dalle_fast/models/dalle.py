"""Stage-2 DALL-E transformer (Ramesh et al. 2021, Sec. 2.2 and App. B): a decoder-only model over
``[BOS, text (text_len - 1 tokens) | image tokens (image_size**2)]``.

Sequence and vocabularies (``T = text_len`` positions including BOS, ``S = image_size``)::

    position 0            BOS (config.bos_id)
    positions 1 .. T-1    caption ids from the tokenizer, padded per position (pad_base + i)
    positions T .. T+S*S  image codes from the dVAE, in raster order

    output head           text_vocab + image_vocab logits: id t < text_vocab is text token t,
                          id text_vocab + c is image code c

Position ``p`` predicts the token at ``p + 1``: text positions ``0 .. T-2`` predict the caption, the
last text position ``T-1`` predicts image code 0 and image position ``T + m`` predicts code ``m + 1``.
The loss is ``text_loss_weight`` (1/8) text cross-entropy (over the text vocabulary) plus the rest
(7/8) image cross-entropy (over the image vocabulary), as in the paper.

Attention layer ``i`` uses ``dalle_fast.Layout(kinds[i], T, S)`` (default
``dalle_fast.paper_schedule(depth)``), computed by ``dalle_fast.sparse_attention`` in each block's
:class:`dalle_fast.nn.SparseAttention`. For generation the model implements the step API of
:mod:`dalle_fast.engine`: :meth:`DALLE.setup_caches` (one :class:`dalle_fast.engine.KVCache` per
layer), :meth:`DALLE.prefill` (the prompts' text, once per prompt) and :meth:`DALLE.decode_step`
(one image token per row, ``decode_attention`` over the cache).

Classifier-free guidance: during training each caption is replaced by all-padding text with
probability ``caption_dropout``, so the model also learns the unconditional distribution
(:meth:`DALLE.null_text`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import KVCache
from ..masks import KINDS, Layout, _int_at_least, _positive_int, paper_schedule
from ..nn.attention import SparseAttention
from ..ops import LinearPack, pack_module
from ..ops.branch import AttentionBranch, MlpBranch
from ..ops.linear import step_parts
from ..nn.functional import vocab_slice_cross_entropy


@dataclass(frozen=True)
class DALLEConfig:
    """Transformer hyper-parameters. Use :meth:`preset` / :meth:`for_tokenizer`.

    ``text_len`` counts BOS (captions have ``text_len - 1`` ids). ``bos_id``/``pad_base`` default to
    the top of the text vocabulary (``pad_base = text_vocab - (text_len - 1)``, ``bos_id = pad_base - 1``);
    with a tokenizer use :meth:`for_tokenizer`. ``kinds``: one mask kind per layer (default: the
    paper's schedule).
    """

    text_vocab: int = 16384
    image_vocab: int = 8192
    text_len: int = 256
    image_size: int = 32
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dim_head: int = 64
    mlp_mult: int = 4
    kinds: tuple[str, ...] | None = None
    conv_kernel_size: int = 11
    conv_like_kernel_size: int = 5
    conv_like_dilation: int = 1
    bos_id: int | None = None
    pad_base: int | None = None
    caption_dropout: float = 0.1
    text_loss_weight: float = 1.0 / 8

    def __post_init__(self) -> None:
        for name in ("text_vocab", "image_vocab", "image_size", "dim", "depth", "heads", "dim_head", "mlp_mult",
                     "conv_kernel_size", "conv_like_kernel_size", "conv_like_dilation"):
            _positive_int(name, getattr(self, name))
        _int_at_least("text_len (BOS + at least one caption token)", self.text_len, 2)
        if self.kinds is not None:
            kinds = tuple(self.kinds)
            if len(kinds) != self.depth:
                raise ValueError(f"kinds must list one kind per layer ({self.depth}), got {len(kinds)}")
            for k in kinds:
                if k not in KINDS:
                    raise ValueError(f"kinds must be drawn from {KINDS}, got {k!r}")
            object.__setattr__(self, "kinds", kinds)
        for name in ("bos_id", "pad_base"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
        for name in ("caption_dropout", "text_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        caption = self.text_len - 1
        pad_base = self.text_vocab - caption if self.pad_base is None else self.pad_base
        bos_id = pad_base - 1 if self.bos_id is None else self.bos_id
        if not 0 <= pad_base <= self.text_vocab - caption:
            raise ValueError(f"pad_base must leave {caption} padding ids inside text_vocab={self.text_vocab}, "
                             f"got {pad_base}")
        if not 0 <= bos_id < self.text_vocab:
            raise ValueError(f"bos_id must be in [0, text_vocab={self.text_vocab}), got {bos_id}")
        object.__setattr__(self, "pad_base", pad_base)
        object.__setattr__(self, "bos_id", bos_id)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.text_loss_weight <= 1.0:
            raise ValueError(f"text_loss_weight must be in [0, 1], got {self.text_loss_weight}")

    @property
    def vocab_size(self) -> int:
        """Size of the output head: text + image vocabularies."""
        return self.text_vocab + self.image_vocab

    @property
    def image_tokens(self) -> int:
        return self.image_size * self.image_size

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_tokens

    def layer_kinds(self) -> tuple[str, ...]:
        return self.kinds if self.kinds is not None else tuple(paper_schedule(self.depth))

    def layouts(self) -> list[Layout]:
        """One :class:`dalle_fast.Layout` per layer."""
        out = []
        for kind in self.layer_kinds():
            kernel = {"conv": self.conv_kernel_size, "conv_like": self.conv_like_kernel_size}.get(kind, 11)
            out.append(Layout(kind, self.text_len, self.image_size, kernel_size=kernel,
                              dilation=self.conv_like_dilation if kind == "conv_like" else 1))
        return out

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DALLEConfig":
        """``tiny`` (CPU demo: text 16, 8x8 image tokens from the tiny dVAE, 4 layers of width 192),
        ``small`` (the paper's sequence shape, text 256 + 32x32 image tokens, 8 layers of width 256),
        ``paper`` (64 layers, 62 heads of 64, width 3968: defined, not trained here)."""
        if name not in DALLE_PRESETS:
            raise ValueError(f"preset must be one of {sorted(DALLE_PRESETS)}, got {name!r}")
        fields = {**dataclasses.asdict(DALLE_PRESETS[name]), "bos_id": None, "pad_base": None}
        return cls(**{**fields, **overrides})  # bos_id/pad_base re-derived unless given

    @classmethod
    def for_tokenizer(cls, tokenizer, preset: str = "tiny", **overrides: Any) -> "DALLEConfig":
        """Preset with the vocabulary layout of a :class:`dalle_fast.tokenizer.Tokenizer`
        (``text_len`` is capped at ``tokenizer.text_len + 1``)."""
        text_len = overrides.pop("text_len", min(cls.preset(preset).text_len, tokenizer.text_len + 1))
        if text_len - 1 > tokenizer.text_len:
            raise ValueError(f"text_len - 1 = {text_len - 1} exceeds the tokenizer's text_len {tokenizer.text_len}")
        return cls.preset(preset, text_vocab=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                          pad_base=tokenizer.pad_base, text_len=text_len, **overrides)


DALLE_PRESETS: dict[str, DALLEConfig] = {
    "tiny": DALLEConfig(text_vocab=512, image_vocab=512, text_len=16, image_size=8, dim=192, depth=4, heads=6,
                        dim_head=32),
    "small": DALLEConfig(text_vocab=16384, image_vocab=8192, text_len=256, image_size=32, dim=256, depth=8, heads=4,
                         dim_head=64),
    "paper": DALLEConfig(text_vocab=16384, image_vocab=8192, text_len=256, image_size=32, dim=3968, depth=64,
                         heads=62, dim_head=64),
}


def _check_range(ids: torch.Tensor, high: int, message: str, sync: bool) -> None:
    """ValueError(message) unless ``ids`` lie in ``[0, high)``. CPU tensors (or ``sync``) are read on the
    host; otherwise a device-side assertion checks them without waiting for the device."""
    if not ids.numel():
        return
    if sync or ids.device.type == "cpu":
        if int(ids.min()) < 0 or int(ids.max()) >= high:
            raise ValueError(message)
    else:
        torch._assert_async(((ids >= 0) & (ids < high)).all(), message)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``. x ``(B, n, dim)``."""

    def __init__(self, cfg: DALLEConfig, layout: Layout) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = SparseAttention(cfg.dim, cfg.heads, cfg.dim_head, layout)
        hidden = cfg.mlp_mult * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    @property
    def layout(self) -> Layout:
        return self.attn.layout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
                index: int | None = None, packs: Sequence | None = None) -> torch.Tensor:
        """``cache``/``pos``/``index``: as :meth:`dalle_fast.nn.SparseAttention.forward` (generation);
        ``packs``: :meth:`step_packs` for a decode step, or None."""
        if packs is None:
            x = x + self.attn(self.norm1(x), cache, pos, index)
            return x + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), cache, pos, index, packs[:2])
        return x + packs[2](self.norm2(x))

    def step_packs(self) -> tuple:
        """The block's to_qkv, to_out and mlp with their linear layers packed for a decode step."""
        return pack_module(self.attn.to_qkv), pack_module(self.attn.to_out), pack_module(self.mlp)

    def step_branches(self, cache: KVCache, packs: tuple | None = None):
        """The block as two branch ops of a decode step (:mod:`dalle_fast.ops.branch`) on ``cache`` and
        its :meth:`step_packs` (None: its own linear layers), or None where the block is not what they
        compute (a forced attention backend, an approximate GELU)."""
        to_qkv, to_out, mlp = packs if packs is not None else (self.attn.to_qkv, self.attn.to_out, self.mlp)
        parts = step_parts(mlp)
        if (self.attn.backend not in (None, "cpu") or len(parts) != 3 or type(parts[1]) is not nn.GELU
                or parts[1].approximate != "none"):
            return None
        dim = self.norm1.normalized_shape[0]
        try:
            return (AttentionBranch(dim=dim, norm=self.norm1, to_qkv=to_qkv, heads=self.attn.heads, cache=cache,
                                    layout=self.layout, to_out=to_out),
                    MlpBranch(dim=dim, norm=self.norm2, w1=parts[0], w2=parts[2], geglu=False,
                              text_len=self.layout.text_len, image_size=self.layout.image_size))
        except ValueError:
            return None


class DALLE(nn.Module):
    """Decoder-only text-to-image transformer.

    Shapes: ``text`` ``(B, text_len - 1)`` int64 caption ids (no BOS), ``codes`` ``(B, n)`` or
    ``(B, S, S)`` int64 image codes in ``[0, image_vocab)``.
    """

    def __init__(self, config: DALLEConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or DALLEConfig()
        self.text_emb = nn.Embedding(cfg.text_vocab, cfg.dim)
        self.image_emb = nn.Embedding(cfg.image_vocab, cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_len, cfg.dim))
        self.image_row = nn.Parameter(torch.zeros(cfg.image_size, cfg.dim))
        self.image_col = nn.Parameter(torch.zeros(cfg.image_size, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, layout) for layout in cfg.layouts())
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        for p in (self.text_emb.weight, self.image_emb.weight, self.text_pos, self.image_row, self.image_col):
            nn.init.normal_(p, std=0.02)
        self.register_buffer("pad_ids", torch.arange(cfg.text_len - 1) + cfg.pad_base, persistent=False)
        self.caches: list[KVCache] | None = None  # generation caches (setup_caches), one per layer
        self.packs: tuple | None = None  # the decode step's packed linear layers (setup_caches), or None

    # -- input checks ----------------------------------------------------------------------------
    def check_text(self, text: torch.Tensor, name: str = "text", *, sync: bool = True) -> None:
        """ValueError unless ``text`` is ``(B, text_len - 1)`` ids in ``[0, text_vocab)``; with ``sync=False``
        the values of a non-CPU tensor are checked by a device-side assertion (no host sync)."""
        cfg = self.config
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != cfg.text_len - 1:
            raise ValueError(f"{name} must be a (B, text_len - 1 = {cfg.text_len - 1}) tensor of caption ids, got "
                             f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
        if text.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be int64 or int32, got {text.dtype}")
        _check_range(text, cfg.text_vocab, f"{name} ids must lie in [0, text_vocab={cfg.text_vocab})", sync)

    def flat_codes(self, codes: torch.Tensor, name: str = "codes", *, sync: bool = True) -> torch.Tensor:
        """Check ``codes`` ``(B, n)`` or ``(B, S, S)`` and return them as ``(B, n)`` int64 (``sync``: as
        :meth:`check_text`)."""
        cfg = self.config
        if not isinstance(codes, torch.Tensor) or codes.dim() not in (2, 3):
            raise ValueError(f"{name} must be (B, n) or (B, {cfg.image_size}, {cfg.image_size}), got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.dim() == 3 and codes.shape[1:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"{name} must be (B, {cfg.image_size}, {cfg.image_size}), got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"{name} must be integers, got {codes.dtype}")
        flat = codes.flatten(1).long()  # (not reshape(B, -1): ambiguous for B = 0)
        if flat.shape[1] > cfg.image_tokens:
            raise ValueError(f"{name} has {flat.shape[1]} tokens, more than image_size**2 = {cfg.image_tokens}")
        _check_range(flat, cfg.image_vocab, f"{name} must lie in [0, image_vocab={cfg.image_vocab})", sync)
        return flat

    # -- pieces ----------------------------------------------------------------------------------
    def null_text(self, batch: int) -> torch.Tensor:
        """All-padding captions ``(batch, text_len - 1)``: the unconditional input for guidance."""
        return self.pad_ids.expand(batch, -1).clone()

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, T - 1)`` caption ids -> ``(B, T, dim)`` with BOS prepended and text positions added."""
        bos = torch.full_like(text[:, :1], self.config.bos_id)
        return self.text_emb(torch.cat([bos, text], 1).long()) + self.text_pos

    def embed_image(self, codes: torch.Tensor, index: torch.Tensor | int = 0) -> torch.Tensor:
        """Image codes ``(B, n)`` at image indices ``index .. index + n - 1`` -> ``(B, n, dim)``.

        ``index``: int, or an int64 tensor (0-dim or ``(B,)``, on the codes' device) for one
        token per row during decoding (no host synchronisation).
        """
        s = self.config.image_size
        m = torch.arange(codes.shape[1], device=codes.device) + (
            index.reshape(-1, 1) if isinstance(index, torch.Tensor) else index)
        return self.image_emb(codes) + self.image_row[torch.div(m, s, rounding_mode="floor")] + self.image_col[m % s]

    def embed(self, text: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """``[BOS, text | codes]`` -> ``(B, T + n, dim)``."""
        x = self.embed_text(text)
        if codes is not None and codes.shape[1]:
            x = torch.cat([x, self.embed_image(codes)], 1)
        return x

    def hidden(self, x: torch.Tensor, caches: Sequence[KVCache] | None = None, pos: torch.Tensor | None = None,
               index: int | None = None, packs: Sequence | None = None) -> torch.Tensor:
        """Run the blocks and the final norm; with ``caches`` (one per layer) a prefill (``pos`` None)
        or a decode step at ``pos``, as :meth:`dalle_fast.nn.SparseAttention.forward` (``packs``: each
        block's :meth:`Block.step_packs`, or None)."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos, index, None if packs is None else packs[i])
        return self.norm(x)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., text_vocab)``: the head's text rows."""
        tv = self.config.text_vocab
        return F.linear(h, self.head.weight[:tv], self.head.bias[:tv])

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., image_vocab)``: the head's image rows (code ``c`` is column ``c``)."""
        tv = self.config.text_vocab
        return F.linear(h, self.head.weight[tv:], self.head.bias[tv:])

    # -- step API (dalle_fast.engine.StepModel) ---------------------------------------------------
    def setup_caches(self, prompt_index: torch.Tensor, *, dense: bool = False) -> None:
        """Static caches for ``prompt_index.numel()`` rows, row ``r`` continuing prompt ``prompt_index[r]``
        (``dense``: the full-cache baseline instead of shared text + image-only caches)."""
        cfg = self.config
        self.caches = [KVCache(prompt_index, cfg.text_len, cfg.image_tokens, dense) for _ in self.blocks]
        # the fast path's decode step runs its linear layers on packed weights (CPU, float32); the
        # dense baseline keeps torch's nn.Linear, as a plain static-cache decoder has
        self.packs = self.branches = None
        dev, dt = self.head.weight.device, self.head.weight.dtype
        if not dense and LinearPack.serves(dev, dt):
            tv = cfg.text_vocab
            self.packs = ([block.step_packs() for block in self.blocks],
                          LinearPack(self.head.weight[tv:], self.head.bias[tv:]))
        # and each block as two branch ops (CPU, float32), on the packs where there are some
        if not dense and AttentionBranch.serves(dev, dt):
            packs = self.packs[0] if self.packs is not None else [None] * len(self.blocks)
            branches = [block.step_branches(c, p) for block, c, p in zip(self.blocks, self.caches, packs)]
            self.branches = None if any(b is None for b in branches) else branches

    def clear_caches(self) -> None:
        self.caches = self.packs = self.branches = None

    def prefill(self, text: torch.Tensor) -> torch.Tensor:
        """Captions ``(P, T - 1)`` (unchecked, int64) -> image logits ``(P, image_vocab)`` of the last text
        position; fills the caches' shared text keys/values."""
        h = self.hidden(self.embed_text(text), self._step_caches())
        return self.image_logits(h[:, -1])

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, index: int) -> torch.Tensor:
        """Image tokens ``(rows,)`` at position ``pos`` (0-dim int64 device tensor; ``index`` the same on
        the host, read only by the dense baseline) -> image logits ``(rows, image_vocab)`` of ``pos + 1``."""
        x = self.embed_image(tokens[:, None], pos - self.config.text_len)
        packs = getattr(self, "packs", None)  # (absent on models pickled before the packs)
        branches = getattr(self, "branches", None)
        if branches is not None and index is not None:  # eager CPU step: one op per branch
            for attn, mlp in branches:
                x = attn(x, x, pos)
                x = mlp(x, x, pos)
            h = self.norm(x)[:, 0]
            return self.image_logits(h) if packs is None else packs[1](h)
        if packs is None:
            return self.image_logits(self.hidden(x, self._step_caches(), pos, index)[:, 0])
        return packs[1](self.hidden(x, self._step_caches(), pos, index, packs[0])[:, 0])

    def _step_caches(self) -> list[KVCache]:
        caches = getattr(self, "caches", None)  # (absent on models pickled before the step API)
        if caches is None:
            raise RuntimeError("no generation caches: call setup_caches first")
        return caches

    # -- full passes -----------------------------------------------------------------------------
    def logits(self, text: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits ``(B, T + n, text_vocab + image_vocab)`` for
        ``[BOS, text | codes]`` with ``n <= image_size**2`` codes (``(B, n)``)."""
        self.check_text(text)
        codes = None if codes is None else self.flat_codes(codes)
        if codes is not None and codes.shape[0] != text.shape[0]:
            raise ValueError(f"codes has {codes.shape[0]} rows but text has {text.shape[0]}")
        return self.head(self.hidden(self.embed(text, codes)))

    def drop_captions(self, text: torch.Tensor, p: float) -> torch.Tensor:
        """Replace each row of ``text`` by :meth:`null_text` with probability ``p`` (torch's global RNG)."""
        if p <= 0:
            return text
        drop = torch.rand(text.shape[0], device=text.device) < p
        return torch.where(drop[:, None], self.pad_ids.to(text.dtype), text)

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss for captions ``text (B, T - 1)`` and full images ``codes (B, S, S)`` or ``(B, S*S)``.

        Returns ``loss`` = w * text CE + (1 - w) * image CE (``w = text_loss_weight``), ``text_loss``,
        ``image_loss`` (nats per token). Captions are dropped (guidance) in training mode.
        """
        cfg = self.config
        self.check_text(text, sync=False)  # (no host sync per training step on a GPU)
        codes = self.flat_codes(codes, sync=False)
        if codes.shape[1] != cfg.image_tokens:
            raise ValueError(f"codes must hold all {cfg.image_tokens} image tokens, got {codes.shape[1]}")
        if codes.shape[0] != text.shape[0]:
            raise ValueError(f"codes has {codes.shape[0]} rows but text has {text.shape[0]}")
        text = text.long()
        if self.training:
            text = self.drop_captions(text, cfg.caption_dropout)
        h = self.hidden(self.embed(text, codes[:, :-1]))  # (B, T + S*S - 1, dim)
        t = cfg.text_len - 1
        tv = cfg.text_vocab
        text_loss = vocab_slice_cross_entropy(h[:, :t], self.head, 0, tv, text)
        image_loss = vocab_slice_cross_entropy(h[:, t:], self.head, tv, self.head.out_features, codes)
        w = cfg.text_loss_weight
        return {"loss": w * text_loss + (1 - w) * image_loss, "text_loss": text_loss.detach(),
                "image_loss": image_loss.detach()}
