"""Small CLIP reranker (Radford et al. 2021) over dalle_fast BPE ids.

A text transformer over the tokenizer's ids (padding ids ``>= pad_base`` are masked out and the
remaining positions mean-pooled) and a ViT image encoder, both projected to ``embed_dim`` and
L2-normalised; trained with the symmetric InfoNCE loss and a learned temperature. Attention is
plain ``torch.nn.functional.scaled_dot_product_attention``.

Shapes::

    text_ids (B, text_len) int64, images (B, 3, S, S) float in [0, 1]
    score(text_ids, images)        -> (B,)  cosine similarity of each (text, image) pair
    score_matrix(text_ids, images) -> (Bt, Bi) all cosine similarities
    forward(text_ids, images)      -> dict(loss, accuracy, logit_scale) (training)

Under ``torch.distributed`` the loss contrasts against the features of every rank (all-gather with
autograd), so a DDP step equals the single-process step on the full batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..masks import _positive_int


@dataclass(frozen=True)
class CLIPConfig:
    """``vocab_size``/``text_len``/``pad_base`` must match the tokenizer (see :meth:`for_tokenizer`)."""

    vocab_size: int = 16384 + 256 + 1
    text_len: int = 256
    pad_base: int = 16384 + 1
    image_size: int = 256
    patch_size: int = 16
    width: int = 512
    text_layers: int = 6
    image_layers: int = 6
    heads: int = 8
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "text_len", "pad_base", "image_size", "patch_size", "width", "text_layers",
                     "image_layers", "heads", "embed_dim"):
            _positive_int(name, getattr(self, name))
        if not 0 < self.pad_base <= self.vocab_size:
            raise ValueError(f"pad_base must be in (0, vocab_size={self.vocab_size}], got {self.pad_base}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        for name in ("init_temperature", "max_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CLIPConfig":
        """``tiny`` (32 px, 2+2 layers, width 64), ``small`` (64 px, 4+4 layers, width 128),
        ``base`` (256 px, 6+6 layers, width 512)."""
        if name not in CLIP_PRESETS:
            raise ValueError(f"preset must be one of {sorted(CLIP_PRESETS)}, got {name!r}")
        return dataclasses.replace(CLIP_PRESETS[name], **overrides)

    @classmethod
    def for_tokenizer(cls, tokenizer, preset: str = "tiny", **overrides: Any) -> "CLIPConfig":
        """Preset with the vocabulary layout of a :class:`dalle_fast.tokenizer.Tokenizer`."""
        return cls.preset(preset, vocab_size=tokenizer.vocab_size, text_len=tokenizer.text_len,
                          pad_base=tokenizer.pad_base, **overrides)


CLIP_PRESETS: dict[str, CLIPConfig] = {
    "tiny": CLIPConfig(image_size=32, patch_size=4, width=64, text_layers=2, image_layers=2, heads=4, embed_dim=64),
    "small": CLIPConfig(image_size=64, patch_size=8, width=128, text_layers=4, image_layers=4, heads=4, embed_dim=128),
    "base": CLIPConfig(),
}


class Block(nn.Module):
    """Pre-LN transformer block. x (B, L, D), key_mask (B, L) bool (True = attend) or None."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """ids (B, text_len) -> features (B, embed_dim), mean over non-padding positions."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.pad_base = cfg.pad_base
        self.token = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.text_len, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids < self.pad_base
        keep[:, 0] = True  # an all-padding row still attends somewhere
        x = self.token(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, keep)
        w = keep.to(x.dtype).unsqueeze(-1)
        return self.proj(self.ln((x * w).sum(1) / w.sum(1)))


class ImageEncoder(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> features (B, embed_dim): ViT, mean over patches."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn((cfg.image_size // cfg.patch_size) ** 2, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.image_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images * 2 - 1).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.ln(x.mean(1)))


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized (B, D) tensors of all ranks along dim 0; the backward pass sums the
    gradients of every rank and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), 0)[dist.get_rank()]


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather (with autograd) along dim 0 across ranks; returns (gathered, offset of this rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in at least float32 (features may come out of bf16 autocast)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


class CLIP(nn.Module):
    """Contrastive text-image model for reranking generated images."""

    def __init__(self, config: CLIPConfig | None = None) -> None:
        super().__init__()
        self.config = config or CLIPConfig()
        self.text = TextEncoder(self.config)
        self.image = ImageEncoder(self.config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / self.config.init_temperature)))

    def _check(self, text_ids: torch.Tensor | None, images: torch.Tensor | None) -> None:
        cfg = self.config
        if text_ids is not None:
            if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or text_ids.shape[1] != cfg.text_len:
                raise ValueError(f"text_ids must be a (B, {cfg.text_len}) tensor, got "
                                 f"{tuple(text_ids.shape) if isinstance(text_ids, torch.Tensor) else type(text_ids).__name__}")
            if text_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"text_ids must be int64 or int32, got {text_ids.dtype}")
            if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= cfg.vocab_size):
                raise ValueError(f"text_ids must lie in [0, {cfg.vocab_size})")
        if images is not None:
            shape = (3, cfg.image_size, cfg.image_size)
            if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
                raise ValueError(f"images must be a (B, {', '.join(map(str, shape))}) tensor, got "
                                 f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
            if not images.is_floating_point():
                raise ValueError(f"images must be floating with values in [0, 1], got {images.dtype}")
            if images.isnan().any():  # NaN passes both range compares
                raise ValueError("images contains NaN")
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError(f"images values must lie in [0, 1], got range "
                                 f"[{images.min().item():.3g}, {images.max().item():.3g}]")

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, text_len) ids -> (B, embed_dim) unit vectors."""
        self._check(text_ids, None)
        return self._text_features(text_ids)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1], any floating dtype (cast to the model's) -> (B, embed_dim) unit vectors."""
        self._check(None, images)
        return self._image_features(images)

    # the encoders on inputs already checked (score and forward check both inputs once)
    def _text_features(self, text_ids: torch.Tensor) -> torch.Tensor:
        return _unit(self.text(text_ids.long()))

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return _unit(self.image(images.to(self.image.patch.weight.dtype)))

    @torch.no_grad()
    def score(self, text_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each pair: text_ids (B, text_len), images (B, 3, S, S) -> (B,)."""
        self._check(text_ids, images)
        if text_ids.shape[0] != images.shape[0]:
            raise ValueError(f"text_ids has {text_ids.shape[0]} rows but images has {images.shape[0]}; "
                             "use score_matrix for all pairs")
        return (self._text_features(text_ids) * self._image_features(images)).sum(-1)

    @torch.no_grad()
    def score_matrix(self, text_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """All cosine similarities: (Bt, text_len), (Bi, 3, S, S) -> (Bt, Bi)."""
        return self.encode_text(text_ids) @ self.encode_image(images).t()

    def forward(self, text_ids: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the (global) batch. Returns ``loss``, ``accuracy`` (top-1, both
        directions, local rows) and ``logit_scale``."""
        self._check(text_ids, images)
        if text_ids.shape[0] != images.shape[0]:
            raise ValueError(f"text_ids has {text_ids.shape[0]} rows but images has {images.shape[0]}")
        if text_ids.shape[0] == 0:
            raise ValueError("text_ids and images must hold at least one pair to compute the loss, got batch size 0")
        t, i = self._text_features(text_ids), self._image_features(images)
        t_all, offset = _gather(t)
        i_all, _ = _gather(i)
        scale = self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()
        labels = torch.arange(t.shape[0], device=t.device) + offset
        logits_t = scale * t @ i_all.t()  # (B, N): each local text against every image
        logits_i = scale * i @ t_all.t()
        loss = (F.cross_entropy(logits_t, labels) + F.cross_entropy(logits_i, labels)) / 2
        acc = ((logits_t.argmax(1) == labels).float().mean() + (logits_i.argmax(1) == labels).float().mean()) / 2
        return {"loss": loss, "accuracy": acc.detach(), "logit_scale": scale.detach()}
