"""The generation engine: one static-cache decode loop for every model that implements the step API.

The step API (:class:`StepModel`, in the manner of gpt-fast) is what a model offers the engine:

- ``setup_caches(prompt_index, dense=False)``: static caches for ``rows = prompt_index.numel()``
  sequences; row ``r`` continues prompt ``prompt_index[r]`` (a layer's cache is a :class:`KVCache`).
- ``prefill(prompts)``: run the prompts' text once (``P`` rows, not ``rows``), keep each layer's
  text keys/values as the prompts' *shared* text cache, return the image logits ``(P, V)`` of the
  last text position.
- ``decode_step(tokens, pos, index)``: feed one image token per row at sequence position ``pos``
  (a 0-dim int64 device tensor, so the step can be captured in a CUDA graph; ``index`` is the same
  position on the host, for paths that cannot be captured, and None in a captured or compiled step,
  which must index with ``pos`` on the device) and return the image logits ``(rows, V)`` of the next
  position.
- ``clear_caches()``: drop the caches.

:class:`dalle_fast.models.dalle.DALLE` implements it itself; the DALLE-pytorch adapter wraps its model
in a small object that does (:mod:`dalle_fast.integrations.dalle_pytorch`). :class:`Engine` drives
either: the prompt rows with their candidates (and, with classifier-free guidance, the unconditional
rows after the conditional ones, all sharing one null prompt), the per-row seeds and draw counter,
the sampler's error flags, priming and the CUDA-graph replay of the step.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from .masks import Layout
from .ops import decode_attention, resolve_backend, sparse_attention
from .ops import sample as _sample

__all__ = ["CompileFallbackWarning", "Engine", "KVCache", "SampleOptions", "StepModel", "compile_after",
           "draw", "reference_step_ops", "resolve_compile", "resolve_cuda_graph"]


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile the decode step and the default (``compile=None``)
    decoded eagerly instead."""


@dataclass(frozen=True)
class SampleOptions:
    """Sampler options of one generation (see :func:`dalle_fast.sample`)."""
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float


class StepModel(Protocol):
    """What :class:`Engine` drives (see the module docstring)."""

    def setup_caches(self, prompt_index: torch.Tensor, *, dense: bool = False) -> None: ...

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor: ...

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, index: int) -> torch.Tensor: ...

    def clear_caches(self) -> None: ...

    # optional: after setup_caches, not None when the eager step runs each residual branch as one op
    # (dalle_fast.ops.branch); compile="auto" then stays eager, the faster step (bench/RESULTS.md)
    branches: Optional[list]


class KVCache:
    """One attention layer's static cache for ``rows`` sequences.

    ``dense=False`` (the fast path): the prompts' text keys/values ``(P, H, T, D)`` are kept once and
    shared by their rows through ``prompt_index``; each row has an image-only cache ``(rows, H, S*S, D)``
    and a step reads only the keys the layout allows (:func:`dalle_fast.decode_attention`).
    ``dense=True`` (the baseline): a full cache ``(rows, H, T + S*S, D)`` per row, the text copied
    into every row, and masked dense attention over the prefix.
    """

    def __init__(self, prompt_index: torch.Tensor, text_len: int, image_tokens: int, dense: bool = False) -> None:
        self.prompt_index, self.text_len, self.image_tokens, self.dense = prompt_index, text_len, image_tokens, dense
        self.text_k = self.text_v = self.k = self.v = None

    def prefill(self, q, k, v, layout: Layout, *, scale: Optional[float] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """Attention over the prompts' text ``(P, H, T, D)``; keeps its keys/values and allocates the caches."""
        self.text_k, self.text_v = k.contiguous(), v.contiguous()
        rows, T = self.prompt_index.numel(), self.text_len
        length = T + self.image_tokens if self.dense else self.image_tokens
        self.k, self.v = (t.new_zeros((rows, t.shape[1], length, t.shape[3])) for t in (self.text_k, self.text_v))
        if self.dense:
            self.k[:, :, :T], self.v[:, :, :T] = self.text_k[self.prompt_index], self.text_v[self.prompt_index]
        return sparse_attention(q, k, v, layout, scale=scale, backend=backend)

    def decode(self, q, k, v, pos: torch.Tensor, index: int, layout: Layout, *,
               scale: Optional[float] = None) -> torch.Tensor:
        """One token per row at position ``pos`` (``index`` on the host): writes its key/value, attends."""
        if not self.dense:
            return decode_attention(q, k, v, self.k, self.v, pos, layout, scale=scale, text_k_cache=self.text_k,
                                    text_v_cache=self.text_v, prompt_index=self.prompt_index)
        p = index
        self.k[:, :, p] = k[:, :, 0]
        self.v[:, :, p] = v[:, :, 0]
        mask = layout.allowed(torch.tensor(p), torch.arange(p + 1)).to(q.device)[None]  # (1, p + 1)
        return F.scaled_dot_product_attention(q, self.k[:, :, :p + 1], self.v[:, :, :p + 1], attn_mask=mask,
                                              scale=scale)


def draw(logits: torch.Tensor, rows: int, seeds: torch.Tensor, step, opts: SampleOptions,
         errors: Optional[torch.Tensor] = None, sample: Callable = _sample) -> torch.Tensor:
    """Image logits of ``rows`` conditional rows (then ``rows`` unconditional ones with guidance) -> codes.
    The sampler's error flag of each row is OR-ed into ``errors`` (int32 ``(rows,)``, on the device,
    no host sync; :func:`dalle_fast.ops.check_error_flags` reads it once the codes are done): the
    CUDA kernel draws the lowest token for a row with NaN/+inf logits and flags it, the CPU kernel raises."""
    guided = logits.shape[0] != rows
    tokens, flag = sample(logits[:rows], seeds=seeds, step=step, temperature=opts.temperature, top_k=opts.top_k,
                          top_p=opts.top_p, uncond_logits=logits[rows:] if guided else None,
                          cfg_scale=opts.cfg_scale, return_error_flag=True)
    if errors is not None:
        errors.bitwise_or_(flag)
    return tokens


def reference_step_ops(device: torch.device) -> list[str]:
    """The decode-step ops that would run on the ``reference`` backend on ``device`` (forced by
    ``$DALLE_FAST_BACKEND``): they read the step on the host, so the step can be neither captured
    in a CUDA graph nor compiled."""
    return [op for op in ("decode_attention", "sample") if resolve_backend(None, device, op=op) == "reference"]


def resolve_compile(compile: Optional[bool], device: torch.device, *, default: bool):
    """``compile`` as the generate functions take it -> what :meth:`Engine.decode` takes: True
    (compile, errors raise), False, or ``"auto"`` for ``compile=None`` where the step can be compiled
    (the CPU, the dalle_fast op backends, and ``default``: the caller's path has a compiled step):
    eager until compiling pays off (:func:`compile_after`)."""
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None, got {compile!r}")
    reference = reference_step_ops(device)
    if compile:
        if device.type != "cpu":
            raise ValueError(f"compile: the compiled decode step runs on the CPU, the model is on {device} "
                             "(on CUDA the step is captured in a CUDA graph instead)")
        if reference:
            raise ValueError(f"compile: {' and '.join(reference)} would run on the 'reference' backend "
                             "($DALLE_FAST_BACKEND), which reads the step on the host and cannot be compiled")
        return True
    if compile is None and default and device.type == "cpu" and not reference:
        return "auto"
    return False


def resolve_cuda_graph(cuda_graph: Optional[bool], device: torch.device, *, sparse: bool = True) -> bool:
    """``cuda_graph`` as the generate functions take it -> whether :meth:`Engine.decode` captures the
    step. ``None`` (default): on CUDA with the sparse KV-cache path (``sparse``), unless a decode op
    would run on the ``reference`` backend (``$DALLE_FAST_BACKEND``), whose ``sample`` reads ``step``
    on the host and cannot be captured; ``True`` where that holds, else a ValueError saying why."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    uncapturable = reference_step_ops(device) if device.type == "cuda" else []
    if cuda_graph is None:
        return device.type == "cuda" and sparse and not uncapturable
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: the decode step is captured on CUDA only, the model is on {device}")
    if cuda_graph and not sparse:
        raise ValueError("cuda_graph needs attention='sparse' (the dense and uncached baselines are not captured)")
    if cuda_graph and uncapturable:
        raise ValueError(f"cuda_graph: {' and '.join(uncapturable)} would run on the 'reference' backend "
                         "($DALLE_FAST_BACKEND), which syncs with the host and cannot be captured")
    return cuda_graph


#: seconds of eager decoding after which ``compile="auto"`` compiles (``$DALLE_FAST_COMPILE_AFTER``)
COMPILE_AFTER_DEFAULT = 30.0


def compile_after() -> float:
    """How many seconds a process decodes one model with the same rows, options and length eagerly
    before ``compile="auto"`` (the generate functions' default on the CPU) compiles its step:
    ``$DALLE_FAST_COMPILE_AFTER`` (seconds, ``0`` = at once, ``inf`` = never), default 30, about what
    a compile costs on the CPU (15-30 s, bench/RESULTS.md). This is the ski-rental rule: a single
    generation never waits for a compile, and repeated ones spend at most about twice the
    time of the better choice in hindsight."""
    raw = os.environ.get("DALLE_FAST_COMPILE_AFTER", "").strip()
    if not raw:
        return COMPILE_AFTER_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise ValueError(f"$DALLE_FAST_COMPILE_AFTER must be a number of seconds >= 0 (or inf), got {raw!r}")
    return value


# owner module -> {(rows, guided, options, image tokens, primed): eager decode seconds so far}
_EAGER_SECONDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Engine:
    """Static caches, step state and the decode loop for ``P`` prompts x ``num_images`` candidates.

    ``prompts``: what ``model.prefill`` takes, the ``P`` prompts and, with ``guided``, one null
    (unconditional) prompt after them. Rows are prompt-major (``r = p * num_images + c``); with
    guidance the unconditional rows follow. ``seeds`` ``(rows,)``: code ``j`` of row ``r`` is drawn
    with ``sample(seeds[r], step=j)``. ``text_len``: the position of the first image token.
    ``sample``: the sampler (:func:`dalle_fast.sample`'s signature).
    """

    def __init__(self, model: StepModel, prompts: torch.Tensor, num_images: int, *, text_len: int,
                 seeds: torch.Tensor, opts: SampleOptions, guided: bool, dense: bool = False,
                 sample: Callable = _sample) -> None:
        self.model, self.opts, self.seeds, self.guided, self.sample = model, opts, seeds, guided, sample
        dev = prompts.device
        n_prompts = prompts.shape[0] - int(guided)
        self.rows = n_prompts * num_images
        prompt_index = torch.arange(n_prompts, device=dev).repeat_interleave(num_images)
        if guided:  # every unconditional row reads the one null prompt
            prompt_index = torch.cat([prompt_index, torch.full_like(prompt_index, n_prompts)])
        self.prompt_index = prompt_index
        model.setup_caches(prompt_index, dense=dense)
        self.first_logits = model.prefill(prompts)[prompt_index]  # (rows [x2], V)
        self.logits = self.first_logits  # logits of the last step (teacher_forced_logits reads them)
        # static step state (device tensors, so a captured graph replays)
        self.tokens = torch.zeros(self.rows, dtype=torch.int64, device=dev)
        self.pos = torch.tensor(text_len, dtype=torch.int64, device=dev)  # position of the token being fed
        self.step = torch.ones(1, dtype=torch.int64, device=dev)          # draw counter of the token being drawn
        self.errors = torch.zeros(self.rows, dtype=torch.int32, device=dev)  # sampler flags, OR-ed (draw)
        self.host_pos = text_len

    def first(self) -> torch.Tensor:
        """Code 0 of every row, from the prefill's last text position."""
        return draw(self.first_logits, self.rows, self.seeds, 0, self.opts, self.errors, self.sample)

    def _feed(self, index: Optional[int], draw_next: bool = True) -> torch.Tensor:
        """Feed ``tokens`` at ``pos`` (host position ``index``, or None), draw the next code into
        ``tokens`` (unless ``draw_next`` is False), advance ``pos`` and ``step``; returns the logits."""
        tok = self.tokens.repeat(2) if self.guided else self.tokens
        logits = self.model.decode_step(tok, self.pos, index)  # (rows [x2], V)
        if draw_next:
            self.tokens.copy_(draw(logits, self.rows, self.seeds, self.step, self.opts, self.errors, self.sample))
        self.pos += 1
        self.step += 1
        return logits

    def run_step(self, draw_next: bool = True) -> None:
        """One eager (or CUDA-graph captured) step: :meth:`_feed` at the host position, which advances."""
        self.logits = self._feed(self.host_pos, draw_next)
        self.host_pos += 1

    def step_body(self) -> None:
        """What :class:`_CompiledStep` compiles and :class:`_GraphedStep` captures: :meth:`_feed` without
        the host position (the model's ``decode_step`` gets ``index=None`` and must not need it), so one
        graph serves every position; the logits are not kept."""
        self._feed(None)

    def decode(self, image_tokens: int, primed: Optional[torch.Tensor] = None, *, cuda_graph: bool = False,
               compile=False, owner=None, skip_primed_draws: bool = False, progress=None) -> torch.Tensor:
        """Generate ``image_tokens`` codes per row -> ``(rows, image_tokens)`` int64.

        ``primed`` ``(rows, n)``: the first ``n`` codes are copied, not drawn (with ``skip_primed_draws``
        their draws are not even made, unless the step is captured or compiled: then a step always draws,
        so one graph serves every position). ``cuda_graph``: capture the step once and replay it.
        ``compile``: run the step compiled by ``torch.compile`` (:class:`_CompiledStep`); True raises a
        RuntimeError if it cannot be compiled, None decodes eagerly then, with a
        :class:`CompileFallbackWarning`; ``"auto"`` (CPU, no CUDA graph; else False): as None once
        ``owner`` (default: the model; the module whose weights the step reads) has been decoded eagerly
        for :func:`compile_after` seconds with these rows, options and length, else eagerly (timed); a
        step that could not be compiled is not tried again; always eagerly when the model's eager step
        runs its branches as one op each (``model.branches``), which is faster than the compiled step.
        ``progress``: a tqdm bar or None.
        """
        if compile is not None and not isinstance(compile, bool) and compile != "auto":
            raise ValueError(f"compile must be True, False, None or 'auto', got {compile!r}")
        auto = None  # (record, key) of compile="auto"
        if compile == "auto":
            compile = False
            if self.tokens.device.type == "cpu" and not cuda_graph and getattr(self.model, "branches", None) is None:
                key = (self.rows, self.guided, self.opts, image_tokens, primed is not None)
                try:
                    record = _EAGER_SECONDS.setdefault(self.model if owner is None else owner, {})
                except TypeError:  # an owner that cannot be weakly referenced: no record, eager
                    record = {}
                auto = record, key
                if record.get(key, 0.0) >= compile_after():
                    compile = None
        if cuda_graph and compile:
            raise ValueError("compile: a CUDA-graph step is not compiled as well; choose one")
        start = time.perf_counter()
        n_prime = 0 if primed is None else primed.shape[1]
        codes = torch.empty(self.rows, image_tokens, dtype=torch.int64, device=self.tokens.device)
        step = _GraphedStep(self) if cuda_graph else _CompiledStep(self, strict=bool(compile)) \
            if compile or compile is None else None
        self.tokens.copy_(primed[:, 0] if n_prime else self.first())
        codes[:, 0] = self.tokens
        if progress is not None:
            progress.update(1)
        with step.settings() if isinstance(step, _CompiledStep) else contextlib.nullcontext():
            for j in range(1, image_tokens):
                if step is not None:
                    step()
                else:
                    self.run_step(draw_next=not (skip_primed_draws and j < n_prime))
                if j < n_prime:
                    self.tokens.copy_(primed[:, j])
                codes[:, j] = self.tokens
                if progress is not None:
                    progress.update(1)
        if auto is not None:
            record, key = auto
            if step is None:
                record[key] = record.get(key, 0.0) + time.perf_counter() - start
            elif step.eager:  # the compile failed (and warned): stay eager for this key
                record[key] = -math.inf
        return codes

    def close(self) -> None:
        """Release the model's caches."""
        self.model.clear_caches()


def _warm_up(body: Callable[[], None]) -> None:
    """Run ``body`` once on a side stream, as CUDA graph capture wants (allocations, lazy inits)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)


def _capture(body: Callable[[], None]) -> Callable[[], None]:
    """``body`` captured in a CUDA graph (its Python runs once, here; its kernels are recorded, not
    executed) -> the graph's replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


class _GraphedStep:
    """Capture ``engine.step_body`` once in a CUDA graph (after one eager warm-up step of the same body)
    and replay it. The body is the device-position step (the model's ``decode_step`` gets
    ``index=None``): a captured host position would be replayed unchanged at every later position."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.replay, self.warm = engine, None, False

    def __call__(self) -> None:
        if not self.warm:
            _warm_up(self.engine.step_body)  # a real step
            self.warm = True
        else:
            if self.replay is None:
                self.replay = _capture(self.engine.step_body)
            self.replay()
        self.engine.host_pos += 1


_COMPILED_BODY = None  # Engine.step_body under torch.compile, made once per process


def _compiled_body():
    global _COMPILED_BODY
    if _COMPILED_BODY is None:
        _COMPILED_BODY = torch.compile(Engine.step_body, fullgraph=True, dynamic=False)
    return _COMPILED_BODY


# Each new model, row count, dtype or set of sampling options is one more compiled graph of the same
# function; more than dynamo's default of 8 is usual in a long-lived process. Past this limit the
# call raises (torch's default would run the step eagerly without saying so).
RECOMPILE_LIMIT = 64


class _CompiledStep:
    """``engine.step_body`` compiled with ``torch.compile(fullgraph=True, dynamic=False)``: the model's
    decode step (every layer with its cached attention, the image logits), guidance and sampling as
    one graph whose inputs are the engine's static tensors (tokens, pos, step counter, caches), all
    updated in place on the device. The Python loop only calls it. The graph is compiled at the
    first call and reused by later engines of the same model, shapes and options (torch's compile
    cache); a generation with new ones compiles another.

    ``strict``: a compile failure raises RuntimeError; otherwise it warns
    (:class:`CompileFallbackWarning`) and the engine steps eagerly from then on (nothing of the
    failed step has run)."""

    def __init__(self, engine: Engine, strict: bool) -> None:
        self.engine, self.strict, self.eager, self.checked = engine, strict, False, False

    @staticmethod
    def settings():
        """Dynamo's settings while the step runs (a recompilation can happen at any call): at most
        ``RECOMPILE_LIMIT`` graphs, then an error instead of torch's silent eager fallback."""
        from torch._dynamo import config
        return config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)

    def __call__(self) -> None:
        if self.eager:
            self.engine.run_step()
            return
        from torch._dynamo import exc
        try:
            if self.checked:
                # Every later step passes the engine's same objects and tensors, whose guards the first
                # step checked: skip their evaluation (~0.6 ms a step for the small preset's ~300 tensors)
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    _compiled_body()(self.engine)
            else:
                _compiled_body()(self.engine)
                self.checked = True
        except (exc.TorchDynamoException, exc.FailOnRecompileLimitHit) as e:
            what = (f"torch.compile could not compile the decode step of {type(self.engine.model).__name__} "
                    f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            if self.strict:
                raise RuntimeError(f"compile: {what}; pass compile=False to decode eagerly") from e
            warnings.warn(f"{what}; decoding eagerly", CompileFallbackWarning, stacklevel=4)
            self.eager = True
            self.engine.run_step()
            return
        self.engine.host_pos += 1
