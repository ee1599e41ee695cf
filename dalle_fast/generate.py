"""Fast generation for :class:`dalle_fast.models.dalle.DALLE`: static KV cache, fused decode step,
CUDA-graph replay, dVAE decoding and CLIP reranking.

The loop is :class:`dalle_fast.engine.Engine` over the model's step API (``setup_caches``,
``prefill``, ``decode_step``); with ``attention="sparse"``, the fast path:

1. **Prefill** each prompt's text once with ``sparse_attention`` (text is plain causal attention in
   every layer kind), keeping its keys/values as the layer's *shared text cache*
   ``(P [+1], H, T, D)``. With guidance the all-padding caption is one extra prompt.
2. **Decode** ``S*S - 1`` steps: the ``R = P*N`` candidate rows (``2R`` with guidance: the
   unconditional rows follow the conditional ones and have their own image caches) feed their last
   token at position ``pos``; every layer calls ``decode_attention`` with the shared text cache
   (``prompt_index`` maps a row to its prompt), which writes the row's new key/value into its
   image-only cache ``(rows, H, S*S, D)`` and reads only the keys the layer's mask allows; the head
   computes image logits only; ``sample`` mixes guidance and draws the next code with the row's
   seed and the step counter. ``pos`` and ``step`` are device tensors incremented in place, so on
   CUDA the whole step is captured once in a CUDA graph and replayed.

Token ``j`` of image ``i`` is drawn with ``sample(seeds[i], step=j)``, so an image depends only on
its prompt, its seed and the options: not on the batch size or on its place in the batch.

Baselines for ``bench/generate.py`` and the tests: ``attention="dense"`` (the same model with a
full static cache per row, text duplicated, and masked dense attention over the prefix) and
``attention="none"`` (recompute the whole prefix every step, no cache).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .engine import Engine, SampleOptions, draw, resolve_compile, resolve_cuda_graph
from .masks import _positive_int
from .models.dalle import DALLE
from .ops.sampling import check_error_flags, sample

__all__ = ["ATTENTION_MODES", "Generation", "Pipeline", "generate_codes", "generate_images", "load_pipeline",
           "teacher_forced_logits"]

ATTENTION_MODES = ("sparse", "dense", "none")


def _seeds(seed: int, seeds: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    if seeds is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        return torch.arange(rows, dtype=torch.int64, device=device) + seed
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != (rows,):
        raise ValueError(f"seeds must be an int64 tensor of shape (prompts * num_images,) = ({rows},)")
    return seeds.to(device)


def _prime(model: DALLE, prime: torch.Tensor | None, prompts: int, device: torch.device) -> torch.Tensor | None:
    """``prime`` ``(P, n)`` or ``(P, r, S)`` (first ``r`` rows) -> ``(P, n)`` int64, ``n < S*S``."""
    if prime is None:
        return None
    s = model.config.image_size
    if isinstance(prime, torch.Tensor) and prime.dim() == 3 and prime.shape[2] == s and prime.shape[1] < s:
        prime = prime.reshape(prime.shape[0], -1)
    flat = model.flat_codes(prime, "prime")
    if flat.shape[0] != prompts:
        raise ValueError(f"prime must have one row per prompt ({prompts}), got {flat.shape[0]}")
    if flat.shape[1] >= model.config.image_tokens:
        raise ValueError(f"prime must leave tokens to generate (< {model.config.image_tokens}), got {flat.shape[1]}")
    return flat.to(device)


def _draw(logits: torch.Tensor, rows: int, seeds: torch.Tensor, step, opts: SampleOptions,
          errors: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dalle_fast.engine.draw` with this module's ``sample``."""
    return draw(logits, rows, seeds, step, opts, errors, sample)


@torch.no_grad()
def generate_codes(model: DALLE, text: torch.Tensor, num_images: int = 1, *, cfg_scale: float = 1.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   seeds: torch.Tensor | None = None, prime: torch.Tensor | None = None, attention: str = "sparse",
                   cuda_graph: bool | None = None, compile: bool | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Sample image codes for ``P`` captions x ``num_images`` candidates.

    Args:
        model: a :class:`DALLE` (its device and dtype are used; put it in eval mode).
        text: ``(P, text_len - 1)`` caption ids (not modified).
        num_images: candidates per caption ``N``.
        cfg_scale: classifier-free guidance scale; ``!= 1`` runs a doubled batch whose second half
            sees all-padding text.
        temperature, top_k, top_p: as :func:`dalle_fast.sample`.
        seed: image ``i`` (prompt-major, ``i = p * N + c``) uses seed ``seed + i``; or give
            ``seeds`` int64 ``(P * N,)`` explicitly.
        prime: optional first codes of each prompt's images, ``(P, n)`` or ``(P, r, S)`` (first
            ``r`` rows), copied into every candidate; the rest is generated.
        attention: ``sparse`` (KV cache + ``decode_attention``, the fast path), ``dense`` (static
            full cache + masked dense attention) or ``none`` (recompute the prefix each step).
        cuda_graph: capture the decode step in a CUDA graph (default: on CUDA with ``sparse``, unless
            ``$DALLE_FAST_BACKEND=reference`` puts the decode ops on the host-syncing reference backend).
        compile: run each decode step as one ``torch.compile``-d graph (CPU, ``sparse``; the same codes
            as the eager step). ``None`` (default): the eager step until this process has decoded the model
            eagerly with the same rows, options and length for ``$DALLE_FAST_COMPILE_AFTER`` seconds
            (default 30, about a compile's cost), then the compiled step (falling back to the eager one
            with a ``CompileFallbackWarning`` if it cannot be compiled): one generation never waits for
            a compile, repeated ones get the compiled step (bench/RESULTS.md). ``True``: compile at
            once; a step that cannot be compiled raises RuntimeError. ``False``: always eager.
        progress: show a progress bar.

    Returns:
        ``(P, N, S, S)`` int64 codes.
    """
    if not isinstance(model, DALLE):
        raise ValueError(f"model must be a DALLE, got {type(model).__name__}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    _positive_int("num_images", num_images)
    model.check_text(text)
    if text.shape[0] == 0:
        raise ValueError("text must hold at least one prompt, got a batch of 0")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    cfg = model.config
    dev = model.head.weight.device
    text = text.to(dev).long()
    prompts, rows = text.shape[0], text.shape[0] * num_images
    seeds = _seeds(seed, seeds, rows, dev)
    primed = _prime(model, prime, prompts, dev)
    primed = None if primed is None else primed.repeat_interleave(num_images, 0)
    n_prime = 0 if primed is None else primed.shape[1]
    opts = SampleOptions(float(cfg_scale), temperature, top_k, top_p)
    guided = opts.cfg_scale != 1.0
    S2 = cfg.image_tokens
    use_graph = resolve_cuda_graph(cuda_graph, dev, sparse=attention == "sparse")
    use_compile = resolve_compile(compile, dev, default=attention == "sparse")
    if compile and attention != "sparse":
        raise ValueError(f"compile needs attention='sparse', got {attention!r}")
    bar = tqdm(total=S2, disable=not progress, desc="generate", unit="tok")

    if attention == "none":
        codes = torch.empty(rows, S2, dtype=torch.int64, device=dev)
        errors = torch.zeros(rows, dtype=torch.int32, device=dev)
        text_rows = text.repeat_interleave(num_images, 0)
        if guided:
            text_rows = torch.cat([text_rows, model.null_text(rows)])
        for j in range(S2):
            if j < n_prime:
                codes[:, j] = primed[:, j]
            else:
                prefix = codes[:, :j].repeat(2, 1) if guided else codes[:, :j]
                h = model.hidden(model.embed(text_rows, prefix))
                codes[:, j] = _draw(model.image_logits(h[:, -1]), rows, seeds, j, opts, errors)
            bar.update(1)
        bar.close()
        check_error_flags(errors, "generate")
        return codes.view(prompts, num_images, cfg.image_size, cfg.image_size)

    engine = Engine(model, _prompts(model, text, guided), num_images, text_len=cfg.text_len, seeds=seeds, opts=opts,
                    guided=guided, dense=attention == "dense", sample=sample)
    try:
        codes = engine.decode(S2, primed, cuda_graph=use_graph, compile=use_compile, progress=bar)
    finally:
        engine.close()
    bar.close()
    check_error_flags(engine.errors, "generate")
    return codes.view(prompts, num_images, cfg.image_size, cfg.image_size)


def _prompts(model: DALLE, text: torch.Tensor, guided: bool) -> torch.Tensor:
    """What :meth:`DALLE.prefill` takes: the captions, then the all-padding caption with guidance."""
    return torch.cat([text, model.null_text(1)]) if guided else text


@torch.no_grad()
def teacher_forced_logits(model: DALLE, text: torch.Tensor, codes: torch.Tensor, *, guided: bool = False,
                          attention: str = "sparse") -> torch.Tensor:
    """Image logits of the cached decode path fed with the given codes (for verification).

    ``text`` ``(B, T - 1)``, ``codes`` ``(B, S, S)``. Returns ``(B, S*S, image_vocab)`` where entry
    ``j`` predicts code ``j``; with ``guided`` ``(2B, ...)``: the conditional rows, then the
    unconditional ones (all-padding text). Equals ``model.logits`` at positions ``T-1 ..`` restricted
    to the image vocabulary (``model.logits(model.null_text(B), ...)`` for the unconditional rows).
    """
    if attention not in ("sparse", "dense"):
        raise ValueError(f"attention must be 'sparse' or 'dense', got {attention!r}")
    model.check_text(text)
    dev = model.head.weight.device
    codes = model.flat_codes(codes).to(dev)
    rows = codes.shape[0]
    if text.shape[0] != rows:
        raise ValueError(f"text has {text.shape[0]} rows but codes has {rows}")
    if rows == 0:
        raise ValueError("text must hold at least one prompt, got a batch of 0")
    engine = Engine(model, _prompts(model, text.to(dev).long(), guided), 1, text_len=model.config.text_len,
                    seeds=torch.zeros(rows, dtype=torch.int64, device=dev),
                    opts=SampleOptions(2.0 if guided else 1.0, 1.0, 0, 1.0), guided=guided,
                    dense=attention == "dense", sample=sample)
    try:
        out = [engine.first_logits]
        for j in range(1, codes.shape[1]):
            engine.tokens.copy_(codes[:, j - 1])
            engine.run_step(draw_next=False)  # the next token is given, not drawn
            out.append(engine.logits)
    finally:
        engine.close()
    return torch.stack(out, 1)[:, :codes.shape[1]]  # one entry per code: none for codes (B, 0)


# -- images and reranking ------------------------------------------------------------------------
@dataclass
class Generation:
    """Result of :func:`generate_images` for ``P`` captions x ``N`` candidates.

    ``images`` ``(P, N, C, H, W)`` in [0, 1] and ``codes`` ``(P, N, S, S)``, each prompt's candidates
    sorted by descending CLIP score when reranked (``scores`` ``(P, N)``), else in sampling order
    (``scores`` None).
    """
    captions: list[str]
    images: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor | None


def check_compatible(model: DALLE, dvae, tokenizer, clip=None) -> None:
    """ValueError unless the dVAE, tokenizer and CLIP fit the transformer."""
    cfg = model.config
    if dvae.config.latent_size != cfg.image_size or dvae.config.vocab_size != cfg.image_vocab:
        raise ValueError(f"the dVAE makes {dvae.config.latent_size}x{dvae.config.latent_size} codes from "
                         f"{dvae.config.vocab_size} entries (image size {dvae.config.image_size}) but the transformer "
                         f"takes {cfg.image_size}x{cfg.image_size} codes from {cfg.image_vocab}")
    if (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.pad_base) != (cfg.text_vocab, cfg.bos_id, cfg.pad_base) \
            or tokenizer.text_len < cfg.text_len - 1:
        raise ValueError(f"tokenizer {tokenizer!r} does not match the transformer's text vocabulary "
                         f"(text_vocab={cfg.text_vocab}, bos_id={cfg.bos_id}, pad_base={cfg.pad_base}, "
                         f"text_len={cfg.text_len})")
    if clip is not None and clip.config.image_size != dvae.config.image_size:
        raise ValueError(f"image size: CLIP takes {clip.config.image_size}px images but the dVAE makes "
                         f"{dvae.config.image_size}px")
    if clip is not None:  # CLIP masks ids >= its pad_base: another tokenizer's padding would be read as text
        cc = clip.config
        if (cc.vocab_size, cc.pad_base) != (tokenizer.vocab_size, tokenizer.pad_base) \
                or cc.text_len > tokenizer.text_len:
            raise ValueError(f"clip: its text vocabulary (vocab_size={cc.vocab_size}, pad_base={cc.pad_base}, "
                             f"text_len={cc.text_len}) does not match tokenizer {tokenizer!r}")


@torch.no_grad()
def _warn_unknown_words(tokenizer, captions: Sequence[str]) -> None:
    """One :class:`~dalle_fast.tokenizer.UnknownWordsWarning` for all captions with words the
    tokenizer splits into pieces (typically words the training captions never held)."""
    from .tokenizer import UnknownWordsWarning
    found = {}
    for caption in dict.fromkeys(captions):
        words = tokenizer.unknown_words(caption) if hasattr(tokenizer, "unknown_words") else []
        if words:
            found[caption] = words
    if found:
        warnings.warn("; ".join(f"caption {c!r}: {', '.join(map(repr, w))}" for c, w in found.items())
                      + (" -- not in the tokenizer's vocabulary as whole words (the training captions did not hold "
                         "them), so the model has likely not learned them"), UnknownWordsWarning, stacklevel=3)


def generate_images(model: DALLE, dvae, tokenizer, captions: str | Sequence[str], num_images: int = 16, *,
                    clip=None, batch_size: int | None = None, **kwargs) -> Generation:
    """Captions -> images, reranked by ``clip`` when given.

    ``kwargs`` go to :func:`generate_codes` (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``,
    ``seed``, ``prime``, ...). ``batch_size``: candidates per :func:`generate_codes` call (default
    all); candidate ``c`` of caption ``p`` always uses seed ``seed + p * N + c``.
    """
    check_compatible(model, dvae, tokenizer, clip)
    _positive_int("num_images", num_images)  # (here too: the chunking below needs it before generate_codes)
    if batch_size is not None:
        _positive_int("batch_size", batch_size)
    if "seeds" in kwargs:
        raise ValueError("seeds: generate_images gives candidate c of caption p the seed seed + p * num_images + c; "
                         "pass seed= (or call generate_codes with seeds=)")
    try:
        captions = [captions] if isinstance(captions, str) else list(captions)
    except TypeError:
        raise ValueError(f"captions must be a str or a sequence of str, got {type(captions).__name__}") from None
    if not captions:
        raise ValueError("captions must not be empty")
    seed = kwargs.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    text = tokenizer.encode(captions, text_len=model.config.text_len - 1)  # ValueError if one is empty
    _warn_unknown_words(tokenizer, captions)
    chunk = batch_size or num_images
    dev = model.head.weight.device
    parts = []
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        seeds = (torch.arange(len(captions))[:, None] * num_images + start + torch.arange(n)).flatten() + seed
        parts.append(generate_codes(model, text, n, seeds=seeds.to(dev), **kwargs))
    codes = torch.cat(parts, 1)  # (P, N, S, S)
    P, N = codes.shape[:2]
    dvae_dev = next(dvae.parameters()).device
    images = dvae.decode(codes.flatten(0, 1).to(dvae_dev))
    images = images.view(P, N, *images.shape[1:])
    scores = None
    if clip is not None:
        clip_dev = next(clip.parameters()).device
        ids = tokenizer.encode(captions, text_len=clip.config.text_len).to(clip_dev)
        scores = clip.score(ids.repeat_interleave(N, 0), images.flatten(0, 1).to(clip_dev)).view(P, N).cpu()
        order = scores.argsort(1, descending=True)
        scores = scores.gather(1, order)
        images = images[torch.arange(P)[:, None], order.to(images.device)]
        codes = codes[torch.arange(P)[:, None], order.to(codes.device)]
    return Generation(captions, images, codes, scores)


@dataclass
class Pipeline:
    """A transformer with its dVAE, tokenizer and optional CLIP; call it like :func:`generate_images`."""
    model: DALLE
    dvae: object
    tokenizer: object
    clip: object | None = None

    def __call__(self, captions: str | Sequence[str], num_images: int = 16, **kwargs) -> Generation:
        return generate_images(self.model, self.dvae, self.tokenizer, captions, num_images, clip=self.clip, **kwargs)


def load_pipeline(checkpoint: str | Path, dvae: str | Path | None = None, clip: str | Path | None = None,
                  tokenizer: str | Path | None = None, device: str | torch.device = "cpu") -> Pipeline:
    """Load a transformer checkpoint (file or directory written by ``dalle-fast train``) with its dVAE
    (default: the checkpoint recorded at training time, whose weights must still be the ones the
    training codes came from), tokenizer (default: ``tokenizer.json`` beside the checkpoint) and
    optional CLIP checkpoint."""
    from .checkpoint import load_checkpoint, load_model
    from .tokenizer import Tokenizer
    ck = load_checkpoint(checkpoint)  # ValueError for a path that holds no checkpoint
    if ck.meta.get("model_type") != "dalle":
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds a {ck.meta.get('model_type')!r} model, not 'dalle'")
    root = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    extra = ck.meta.get("extra", {})
    recorded = dvae is None
    dvae = dvae or extra.get("dvae_checkpoint")
    if dvae is None:
        raise ValueError("dvae: the checkpoint records no dVAE; pass its checkpoint")
    if recorded:
        try:
            dvae_ck = load_checkpoint(dvae)
        except ValueError as err:
            raise ValueError(f"dvae: the dVAE recorded at training time cannot be loaded ({err}); pass the dVAE "
                             "checkpoint the transformer was trained on") from None
        want = extra.get("dvae_sha256")
        if want is not None and dvae_ck.meta["weights_sha256"] != want:
            raise ValueError(f"dvae: {str(dvae_ck.path)!r} is not the dVAE the transformer was trained on (its "
                             "weights changed since); pass that dVAE's checkpoint")
        dvae = dvae_ck.path
    tok_path = Path(tokenizer) if tokenizer is not None else root / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"tokenizer: {str(tok_path)!r} is not a file")
    model = load_model(checkpoint, device)
    dvae_model = load_model(dvae, device)
    clip_model = load_model(clip, device) if clip is not None else None
    for name, m, kind in (("dvae", dvae_model, "DVAE"), ("clip", clip_model, "CLIP")):
        if m is not None and type(m).__name__ != kind:
            raise ValueError(f"{name}: checkpoint holds a {type(m).__name__}, not a {kind}")
    pipe = Pipeline(model, dvae_model, Tokenizer.load(tok_path), clip_model)
    check_compatible(pipe.model, pipe.dvae, pipe.tokenizer, pipe.clip)
    return pipe

