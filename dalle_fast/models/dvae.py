"""Stage-1 discrete VAE of DALL-E (Ramesh et al. 2021, Sec. 2.1 and App. A).

The architecture mirrors OpenAI's released ``dall_e`` Encoder/Decoder module for module (same
names, same residual gains, same 1x1 / 3x3 / 7x7 convolutions, max-pool down and nearest up), so the
official weights load with a key rename (see :mod:`dalle_fast.models.dvae_openai`).

Shapes (``s = image_size // 2 ** (group_count - 1)``, ``K = vocab_size``)::

    encode:  images (B, C, H, W) float in [0, 1]   -> codes  (B, s, s) int64 in [0, K)
    decode:  codes  (B, s, s) int64                -> images (B, C, H, W) float in [0, 1]
    forward: images (B, C, H, W), step             -> dict(loss, recon, kl, ...)  (training)

Training relaxes the categorical posterior with gumbel-softmax; the temperature is annealed from
``tau_start`` (1) to ``tau_end`` (1/16) and the KL weight against the uniform prior ramps up to
``kl_weight`` (6.6), both on cosine schedules. The reconstruction likelihood is the paper's
logit-Laplace distribution on pixels mapped to ``[eps, 1 - eps]`` with ``eps = 0.1``
(``likelihood="logit_laplace"``, the default of every preset but ``demo``).

The ``demo`` preset (the CPU demo's run of about two thousand steps on 32 px shapes) uses a Gaussian likelihood
with a fixed scale instead (``likelihood="gaussian"``): in a short run the logit-Laplace's learned
per-pixel scale ``b`` pays off fastest by sharpening the white background and widening ``b`` on the
few coloured pixels, so the codes stop carrying colour and shapes decode in grey. A fixed scale weighs
every pixel's error alike.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import _int_at_least, _positive_int

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map pixels from [0, 1] to [eps, 1 - eps] (the logit-Laplace support). Any shape."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]. Any shape."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of mapped pixels ``x`` (in (0, 1)) under the logit-Laplace.

    ``p(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``. All tensors (B, C, H, W);
    returns the elementwise NLL (B, C, H, W).
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return (logit_x - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(x) + torch.log1p(-x)


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Negative log-likelihood of mapped pixels ``x`` under a Gaussian of mean ``sigmoid(mu)`` and
    fixed standard deviation ``sigma``. ``x``, ``mu`` (B, C, H, W); returns the elementwise NLL."""
    return (x - torch.sigmoid(mu)) ** 2 / (2 * sigma ** 2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def _cosine_ramp(step: int, steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step >= ``steps``)."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / steps))


@dataclass(frozen=True)
class DVAEConfig:
    """dVAE hyper-parameters. Use :meth:`preset` for the named sizes.

    ``group_count`` residual groups; every group but the last halves the resolution, so the latent
    grid is ``image_size // 2 ** (group_count - 1)`` on a side. Group ``g`` (0-based) has
    ``n_hid * 2 ** g`` channels in the encoder (mirrored in the decoder).
    """

    image_size: int = 256
    channels: int = 3
    vocab_size: int = 8192
    n_hid: int = 256
    n_init: int = 128
    n_blk_per_group: int = 2
    group_count: int = 4
    # training schedule (paper App. A.2)
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_anneal_steps: int = 150_000
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5_000
    # reconstruction likelihood: "logit_laplace" (paper) or "gaussian" (fixed std ``gaussian_sigma``,
    # on the mapped pixels; the decoder's log-scale channels are then unused)
    likelihood: str = "logit_laplace"
    gaussian_sigma: float = 0.1
    # codebook diversity penalty (wav2vec 2.0, Baevski et al. 2020): ``diversity_weight * (log K - H(q_bar))``
    # with ``q_bar`` the encoder's softmax averaged over the batch and the latent grid. 0 (off) in the
    # paper presets; the demo preset needs it to avoid a seed-dependent collapse onto one code.
    diversity_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "vocab_size", "n_hid", "n_init", "n_blk_per_group", "group_count"):
            _positive_int(name, getattr(self, name))
        for name in ("tau_anneal_steps", "kl_warmup_steps"):
            _int_at_least(name, getattr(self, name), 0)
        for name in ("tau_start", "tau_end", "kl_weight", "gaussian_sigma", "diversity_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.n_hid % 4:
            raise ValueError(f"n_hid must be a multiple of 4 (blocks use n_out // 4 channels), got {self.n_hid}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        factor = 2 ** (self.group_count - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2 ** (group_count - 1) = {factor}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"need 0 < tau_end <= tau_start, got tau_start={self.tau_start}, tau_end={self.tau_end}")
        if self.likelihood not in ("logit_laplace", "gaussian"):
            raise ValueError(f"likelihood must be 'logit_laplace' or 'gaussian', got {self.likelihood!r}")
        if not self.gaussian_sigma > 0:
            raise ValueError(f"gaussian_sigma must be > 0, got {self.gaussian_sigma}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight}")

    @property
    def latent_size(self) -> int:
        """Side ``s`` of the latent grid."""
        return self.image_size // 2 ** (self.group_count - 1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DVAEConfig":
        """Named configurations: ``paper`` (256 -> 32x32, K=8192, OpenAI sizes), ``small``
        (64 -> 16x16, K=1024), ``tiny`` (32 -> 8x8, K=512), all with the paper's training recipe, and
        ``demo`` (32 -> 8x8, K=128, the CPU demo's short-run recipe: Gaussian likelihood, see the
        module docstring). ``overrides`` replace fields."""
        if name not in DVAE_PRESETS:
            raise ValueError(f"preset must be one of {sorted(DVAE_PRESETS)}, got {name!r}")
        return dataclasses.replace(DVAE_PRESETS[name], **overrides)


DVAE_PRESETS: dict[str, DVAEConfig] = {
    "paper": DVAEConfig(),
    "small": DVAEConfig(image_size=64, vocab_size=1024, n_hid=64, n_init=64, n_blk_per_group=1, group_count=3,
                        tau_anneal_steps=5_000, kl_warmup_steps=500),
    "tiny": DVAEConfig(image_size=32, vocab_size=512, n_hid=32, n_init=32, n_blk_per_group=1, group_count=3,
                       tau_anneal_steps=2_000, kl_warmup_steps=200),
    # `dalle-fast demo`: ~2000 steps at lr 3e-3 (see dalle_fast.demo.demo_dvae_config). A Gaussian
    # likelihood keeps the shapes' colour after so short a run, sigma 0.05 sharpens their corners,
    # and the diversity term keeps the encoder from collapsing onto one code early on; the KL
    # weight stays the paper's (docs/design-notes.md, "The demo dVAE preset").
    "demo": DVAEConfig(image_size=32, vocab_size=128, n_hid=32, n_init=32, n_blk_per_group=1, group_count=3,
                       tau_anneal_steps=1_800, kl_warmup_steps=180, likelihood="gaussian", gaussian_sigma=0.05,
                       diversity_weight=1.0),
}


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    """Same-padded conv with the OpenAI init (normal, std 1/sqrt(fan_in); zero bias)."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kw ** 2))
    nn.init.zeros_(conv.bias)
    return conv


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; res_path is 4 relu+conv pairs with the given kernel widths."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kw in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = _conv(widths[i], widths[i + 1], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths: list[int], n_layers: int, kernels: tuple[int, int, int, int], resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block_{i + 1}", _ResBlock(widths[i], widths[i + 1], n_layers, kernels)) for i in range(len(widths) - 1))
    if resample is not None:
        layers[resample[0]] = resample[1]
    return nn.Sequential(layers)


class Encoder(nn.Module):
    """Images mapped to [eps, 1-eps] (B, C, H, W) -> codebook logits (B, K, s, s)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(cfg.channels, cfg.n_hid, 7))
        n_in = cfg.n_hid
        for g in range(cfg.group_count):
            n_out = cfg.n_hid * 2 ** g
            widths = [n_in] + [n_out] * cfg.n_blk_per_group
            last = g == cfg.group_count - 1
            blocks[f"group_{g + 1}"] = _group(widths, n_layers, (3, 3, 3, 1),
                                              None if last else ("pool", nn.MaxPool2d(kernel_size=2)))
            n_in = n_out
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(n_in, cfg.vocab_size, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """(Relaxed) one-hot codes (B, K, s, s) -> logit-Laplace statistics (B, 2C, H, W): mu then log b."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(cfg.vocab_size, cfg.n_init, 1))
        n_in = cfg.n_init
        for g in range(cfg.group_count):
            n_out = cfg.n_hid * 2 ** (cfg.group_count - 1 - g)
            widths = [n_in] + [n_out] * cfg.n_blk_per_group
            last = g == cfg.group_count - 1
            blocks[f"group_{g + 1}"] = _group(widths, n_layers, (1, 3, 3, 3),
                                              None if last else ("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            n_in = n_out
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(n_in, 2 * cfg.channels, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(one_hot(codes))`` without materialising the one-hot: the 1x1 input
        conv of a one-hot vector is a column lookup. codes (B, s, s) -> (B, 2C, H, W)."""
        conv = self.blocks.input
        weight = conv.weight[:, :, 0, 0].t()  # (K, n_init)
        h = F.embedding(codes, weight) + conv.bias  # (B, s, s, n_init)
        h = h.permute(0, 3, 1, 2).contiguous()
        for name, module in self.blocks.named_children():
            if name != "input":
                h = module(h)
        return h


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity (exp of the entropy of the code histogram) and number of distinct codes used.

    codes: int tensor of any shape with values in [0, vocab_size).
    """
    counts = torch.bincount(codes.reshape(-1), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": int((counts > 0).sum())}


class DVAE(nn.Module):
    """Discrete VAE: :class:`Encoder` + :class:`Decoder` with the paper's training objective."""

    def __init__(self, config: DVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    # -- input checks ------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor, name: str = "images") -> None:
        cfg = self.config
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor with values in [0, 1], got dtype {images.dtype}")
        if images.shape[1] != cfg.channels:
            raise ValueError(f"{name} has {images.shape[1]} channels but the model takes {cfg.channels}")
        if images.shape[2] != cfg.image_size or images.shape[3] != cfg.image_size:
            raise ValueError(f"{name} is {images.shape[2]}x{images.shape[3]} but the model takes "
                             f"{cfg.image_size}x{cfg.image_size}")
        if images.isnan().any():  # NaN passes both range compares
            raise ValueError(f"{name} contains NaN")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{name} values must lie in [0, 1], got range "
                             f"[{images.min().item():.3g}, {images.max().item():.3g}]")

    def _check_codes(self, codes: torch.Tensor) -> None:
        s, k = self.config.latent_size, self.config.vocab_size
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[1:] != (s, s):
            raise ValueError(f"codes must be a tensor of shape (B, {s}, {s}), got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be int64 or int32, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"codes must lie in [0, {k}), got range [{codes.min().item()}, {codes.max().item()}]")

    # -- inference ---------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) float in [0, 1], any floating dtype (cast to the encoder's) ->
        codebook logits (B, K, s, s)."""
        self._check_images(images)
        return self.encoder(map_pixels(images.to(self.encoder.blocks.input.weight.dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) float in [0, 1] -> codes (B, s, s) int64 (argmax of the logits)."""
        return self.logits(images).argmax(dim=1)

    @staticmethod
    def stats_to_images(stats: torch.Tensor) -> torch.Tensor:
        """Decoder statistics (B, 2C, H, W) -> mean images (B, C, H, W) in [0, 1]."""
        channels = stats.shape[1] // 2
        return unmap_pixels(torch.sigmoid(stats[:, :channels].float()))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, s, s) int in [0, K) -> images (B, C, H, W) float in [0, 1]."""
        self._check_codes(codes)
        return self.stats_to_images(self.decoder.forward_codes(codes.long()))

    # -- training ----------------------------------------------------------------------------
    def schedule(self, step: int) -> tuple[float, float]:
        """(gumbel temperature, KL weight) at optimisation step ``step`` (cosine schedules)."""
        try:
            index = None if isinstance(step, bool) else operator.index(step)  # python, numpy or 0-d tensor ints
        except TypeError:
            index = None
        if index is None or index < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = index
        cfg = self.config
        tau = _cosine_ramp(step, cfg.tau_anneal_steps, cfg.tau_start, cfg.tau_end)
        beta = _cosine_ramp(step, cfg.kl_warmup_steps, 0.0, cfg.kl_weight)
        return tau, beta

    def forward(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """Training objective (negative ELBO, in nats per image dimension) for a batch.

        images (B, C, H, W) in [0, 1]. Returns a dict of scalars: ``loss`` (to minimise), ``recon``
        (NLL of the configured likelihood per dimension), ``kl`` (KL to the uniform prior per latent cell),
        ``diversity`` (``log K`` minus the entropy of the batch-mean posterior; added to the loss times
        ``diversity_weight``), ``tau``, ``beta`` and codebook usage (``perplexity``, ``codes_used``) of the argmax codes.
        """
        tau, beta = self.schedule(step)
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
            raise ValueError("images must hold at least one image to compute the training loss, got batch size 0")
        logits = self.logits(images)  # (B, K, s, s)
        # the relaxed sample is drawn in float32, then fed to the decoder in its own dtype
        z = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1)
        stats = self.decoder(z.to(self.decoder.blocks.input.weight.dtype))
        c = self.config.channels
        x = map_pixels(images.float())
        if self.config.likelihood == "gaussian":
            recon = gaussian_nll(x, stats[:, :c].float(), self.config.gaussian_sigma)
        else:
            recon = logit_laplace_nll(x, stats[:, :c].float(), stats[:, c:].float())
        log_q = F.log_softmax(logits.float(), dim=1)
        q = log_q.exp()
        kl = (q * log_q).sum(dim=1) + math.log(self.config.vocab_size)  # (B, s, s)
        dims = images[0].numel()
        recon_per_image = recon.flatten(1).sum(1)
        kl_per_image = kl.flatten(1).sum(1)
        loss = ((recon_per_image + beta * kl_per_image) / dims).mean()
        # entropy of the batch-mean posterior: its deficit from log K is large when every cell picks one code
        q_bar = q.mean(dim=(0, 2, 3))
        diversity = math.log(self.config.vocab_size) + (q_bar * q_bar.clamp_min(1e-12).log()).sum()
        if self.config.diversity_weight:
            loss = loss + self.config.diversity_weight * diversity
        usage = codebook_usage(logits.detach().argmax(1), self.config.vocab_size)
        return {
            "loss": loss,
            "recon": recon_per_image.mean().detach() / dims,
            "kl": kl.mean().detach(),
            "diversity": diversity.detach(),
            "tau": torch.tensor(tau),
            "beta": torch.tensor(beta),
            "perplexity": torch.tensor(usage["perplexity"]),
            "codes_used": torch.tensor(float(usage["codes_used"])),
        }
