"""Generic training loop (dVAE, CLIP, and later the transformer) with exact resume and DDP.

:class:`Trainer` takes a model, a loss function ``loss_fn(model, batch, step) -> dict`` (with a
``"loss"`` scalar; other scalars are logged) and a map-style dataset. It runs AdamW with linear
warmup + cosine decay, optional bf16 autocast, gradient clipping, a tqdm progress bar (loss, images/s),
and atomic safetensors checkpoints (:mod:`dalle_fast.checkpoint`).

Determinism / exact resume: the global batch of step ``t`` is a pure function of
``(seed, epoch = t // steps_per_epoch, t)`` (a seeded permutation per epoch); checkpoints hold the
step, the optimizer state and every rank's RNG states, so ``N`` steps straight and ``N/2`` steps +
resume + ``N/2`` give the same weights. The learning rate is recomputed from the step.

Distributed: launch with ``torchrun``; :func:`init_distributed` reads its environment and the
trainer wraps the model in DistributedDataParallel. ``batch_size`` is global: rank ``r`` takes the
``r``-th contiguous slice of each global batch, and gradients are averaged, so a DDP step equals a
single-process step on the whole batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from . import checkpoint as ckpt_lib
from .data.codes import report_skipped
from .masks import _int_at_least, _positive_int

LossFn = Callable[[nn.Module, Any, int], Mapping[str, torch.Tensor]]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. ``batch_size`` is the global batch (all ranks)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA with bf16 support), "bf16", "fp32"
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = 3
    log_every: int = 10
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "num_workers"):
            _int_at_least(name, getattr(self, name), 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.keep_checkpoints is not None:  # None keeps all
            _positive_int("keep_checkpoints", self.keep_checkpoints)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        self.betas = tuple(self.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def init_distributed() -> tuple[int, int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``) when ``WORLD_SIZE > 1``: NCCL on CUDA, gloo otherwise. Returns (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, 0


def default_device() -> torch.device:
    """This process's CUDA device under torchrun (``LOCAL_RANK``), CUDA 0, or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """``device`` as a torch.device (None: :func:`default_device`); ValueError naming ``name`` for a
    string torch does not parse or a CUDA device this machine does not have."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {device!r} is not a device ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _jsonable(config: Any) -> dict:
    """A model config (dataclass or dict) as the checkpoint JSON stores it (tuples as lists)."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config))


def inputs_mismatch(saved_extra: Mapping, extra_meta: Mapping) -> str | None:
    """How a checkpoint's recorded inputs (its ``extra`` entries named ``*_sha256``: tokenizer, dVAE)
    differ from this run's ``extra_meta``, or None. Used by :meth:`Trainer.load` and, before any
    expensive preparation, by ``dalle-fast train``."""
    for key, value in extra_meta.items():
        if key.endswith("_sha256") and key in saved_extra and saved_extra[key] != value:
            return (f"was trained with another {key[:-len('_sha256')]} ({key} {str(saved_extra[key])[:12]}..., "
                    f"this run: {str(value)[:12]}...)")
    return None


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of ``epoch``: a permutation of ``range(n)`` determined by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class Trainer:
    """Training loop. ``fit()`` trains to ``config.steps`` and returns the logged metrics.

    ``model`` must produce the loss in its ``forward`` (called by ``loss_fn`` as ``model(...)``) so
    that DDP sees the forward pass. ``dataset`` is map-style; ``collate_fn`` turns a list of items
    into a batch. ``out_dir`` (rank 0 writes) receives checkpoints and ``metrics.jsonl``.
    ``model_type``/``model_config`` are stored in checkpoints for :func:`dalle_fast.checkpoint.load_model`;
    ``extra_meta`` goes into every checkpoint too, and its entries named ``*_sha256`` identify inputs
    the run depends on (the tokenizer, the dVAE): a resume with different ones is refused.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Dataset, config: TrainConfig,
                 out_dir: str | Path | None = None, *, collate_fn: Callable = default_collate,
                 model_type: str = "model", model_config: Any = None, extra_meta: dict | None = None,
                 device: str | torch.device | None = None) -> None:
        self.config = config
        self.rank, self.world, _ = (dist.get_rank(), dist.get_world_size(), 0) if dist.is_initialized() else (0, 1, 0)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the world size {self.world}")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError("dataset must be map-style (define __len__ and __getitem__)")
        self.local_batch = config.batch_size // self.world
        self.steps_per_epoch = len(dataset) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {config.batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.loss_fn, self.dataset, self.collate_fn = loss_fn, dataset, collate_fn
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_type, self.model_config, self.extra_meta = model_type, model_config, extra_meta or {}
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self._ddp: nn.Module | None = None
        self._verified: ckpt_lib.Checkpoint | None = None  # checked by _plan_resume, read once

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        cfg = self.config
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)

    # -- data ----------------------------------------------------------------------------------
    def local_indices(self, step: int) -> list[int]:
        """Dataset indices this rank trains on at ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(len(self.dataset), self.config.seed, epoch)
        start = k * self.config.batch_size + self.rank * self.local_batch
        return perm[start:start + self.local_batch].tolist()

    def _batches(self, start: int):
        """Yield (step, batch) from ``start`` to ``config.steps``, one DataLoader per epoch."""
        step = start
        while step < self.config.steps:
            epoch = step // self.steps_per_epoch
            end = min(self.config.steps, (epoch + 1) * self.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            loader = DataLoader(self.dataset, batch_sampler=[self.local_indices(s) for s in range(step, end)],
                                collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                                worker_init_fn=_ignore_interrupts if self.config.num_workers else None,
                                pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
            for batch in loader:
                yield step, move_to(batch, self.device)
                step += 1

    # -- checkpoints ---------------------------------------------------------------------------
    def _all_rng_states(self) -> list[dict]:
        state = ckpt_lib.get_rng_state()
        if self.world == 1:
            return [state]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, state)
        return gathered

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; all ranks must call)."""
        rng = self._all_rng_states()
        path = None
        if self.rank == 0 and self.out_dir is not None:
            extra = {"train_config": dataclasses.asdict(self.config), "world_size": self.world, **self.extra_meta}
            path = ckpt_lib.save_checkpoint(self.out_dir, self.step, self.model, self.optimizer,
                                            model_type=self.model_type, model_config=self.model_config,
                                            rng=rng, extra=extra, keep=self.config.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore weights, optimizer, step and RNG states from a checkpoint (file or directory)."""
        ck, self._verified = self._verified, None
        if ck is None or ck.path != Path(path):
            ck = ckpt_lib.load_checkpoint(path)
        where = f"resume: checkpoint {str(ck.path)!r}"
        if ck.meta.get("model_type") != self.model_type:
            raise ValueError(f"{where} holds a {ck.meta.get('model_type')!r} model, this run trains {self.model_type!r}")
        if self.model_config is not None and ck.meta.get("model_config") is not None:
            ours = _jsonable(self.model_config)
            theirs = ck.meta["model_config"]
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if differ:
                raise ValueError(f"{where} was trained with a different model config: "
                                 + ", ".join(f"{k}={theirs.get(k)!r} (this run: {ours.get(k)!r})" for k in differ))
        why = inputs_mismatch(ck.meta.get("extra") or {}, self.extra_meta)
        if why:
            raise ValueError(f"{where} {why}")
        try:
            self.model.load_state_dict(ck.model_state)
            if ck.optimizer_state is not None:
                self.optimizer.load_state_dict(move_to(ck.optimizer_state, self.device))
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{where} does not fit this model: {str(err).splitlines()[0]}") from None
        if ck.optimizer_state is None:
            warnings.warn(f"{where} holds no optimizer state: AdamW starts from zero moments, so this run will "
                          "not match an uninterrupted one", stacklevel=2)
        self.step = ck.step
        if self.rank == 0:
            print(f"resuming from {ck.path} (step {ck.step} of {self.config.steps})", flush=True)
        saved = (ck.meta.get("extra") or {}).get("train_config") or {}
        for key in ("seed", "batch_size"):
            if key in saved and saved[key] != getattr(self.config, key):
                warnings.warn(f"resuming with {key}={getattr(self.config, key)} but the checkpoint used "
                              f"{saved[key]}: the data order differs from the original run", stacklevel=2)
        schedule = [k for k in ("steps", "lr", "warmup_steps", "min_lr_ratio")
                    if k in saved and saved[k] != getattr(self.config, k)]
        if schedule:
            warnings.warn("resuming with " + ", ".join(f"{k}={getattr(self.config, k)} (checkpoint: {saved[k]})"
                                                       for k in schedule)
                          + ": the learning-rate schedule differs from the original run's from here on",
                          stacklevel=2)
        rng = ck.meta.get("rng") or []
        if len(rng) == self.world:
            try:
                ckpt_lib.set_rng_state(rng[self.rank])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{where}: its RNG state of rank {self.rank} does not read back "
                                 f"({type(err).__name__}: {err})") from None
        else:
            warnings.warn(f"checkpoint has RNG states of {len(rng)} ranks, running {self.world}: reseeding", stacklevel=2)
            self._seed()

    def _plan_resume(self, resume) -> tuple[Path | None, str | None]:
        """Rank 0, before training: removes the temporary files a killed checkpoint writer left in
        ``out_dir``, then returns ``(checkpoint to resume from or None, why this run may not start
        or None)``. A run starts in a directory without checkpoints, or continues from the newest one
        there that verifies (so that pruning, ``resume="auto"`` and the dVAE a transformer records only
        ever see one run); newer checkpoints that fail to load are set aside (renamed ``*.damaged``,
        kept) with a warning naming each."""
        out = self.out_dir
        if out is None:
            return (Path(resume) if resume not in (None, "auto") else None), None
        removed = ckpt_lib.remove_stale_temp_files(out)
        if removed:
            warnings.warn(f"out_dir {str(out)!r}: removed {len(removed)} unfinished file(s) an interrupted "
                          f"checkpoint write left: {', '.join(p.name for p in removed)}", stacklevel=3)
        existing = ckpt_lib.list_checkpoints(out)
        if resume is None:
            if existing:
                return None, (f"out_dir {str(out)!r} already holds checkpoints (newest: {existing[-1].name}); "
                              "resume='auto' (--resume auto) continues that run; a new run needs a new out_dir")
            return None, None
        if resume == "auto" or (Path(resume).is_dir() and Path(resume).resolve() == out.resolve() and existing):
            return self._newest_verified() if existing else (None, None)
        try:
            resolved = ckpt_lib.resolve_checkpoint(resume)
        except ValueError as err:
            return None, f"resume: {err}"
        if not existing or resolved.resolve() == existing[-1].resolve():
            return resolved, None
        step = ckpt_lib.checkpoint_step(resolved)
        if resolved.parent.resolve() == out.resolve() and step is not None:
            found, damaged = ckpt_lib.newest_verified_checkpoint(out, newer_than=step)
            if found is None:  # every newer checkpoint is damaged: set them aside, go back to this one
                self._set_aside(damaged, resolved)
                return resolved, None
        return None, (f"resume: {str(resolved)!r} is not the newest checkpoint of out_dir {str(out)!r} "
                      f"({existing[-1].name}): training on from it would mix two runs' checkpoints there. To go "
                      "back to it, move the newer checkpoints (.json and .safetensors) out of out_dir first; "
                      "resume='auto' (--resume auto) continues from the newest that verifies; or write this run "
                      "to a new out_dir")

    def _newest_verified(self) -> tuple[Path | None, str | None]:
        found, damaged = ckpt_lib.newest_verified_checkpoint(self.out_dir)
        if found is None:
            return None, (f"resume: no checkpoint in out_dir {str(self.out_dir)!r} verifies: "
                          + "; ".join(f"{p.name} ({why})" for p, why in damaged)
                          + ". Move them out of out_dir to start anew there, or start a new run in a new out_dir")
        self._set_aside(damaged, found.path)
        self._verified = found  # load() takes it instead of reading the file again
        return found.path, None

    @staticmethod
    def _set_aside(damaged: list[tuple[Path, str]], resume_from: Path) -> None:
        for path, why in damaged:
            kept = ckpt_lib.quarantine_checkpoint(path)
            warnings.warn(f"resume: {path.name} is damaged ({why}); resuming from {resume_from.name}; the damaged "
                          f"files are kept as {', '.join(p.name for p in kept) or 'nothing (none left)'}",
                          stacklevel=4)

    def _trim_metrics(self) -> None:
        """Drop the records of ``metrics.jsonl`` past the step this run starts from (a resumed run
        logs those steps again; a fresh one starts the file anew), and unreadable lines."""
        if self.out_dir is None or not (self.out_dir / "metrics.jsonl").is_file():
            return
        path = self.out_dir / "metrics.jsonl"
        kept, dropped = [], False
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                step = None
            if isinstance(step, int) and step <= self.step:
                kept.append(line)
            else:
                dropped = True
        if dropped:
            ckpt_lib.atomic_write(path, "".join(x + "\n" for x in kept).encode())

    def _seed(self) -> None:
        seed = self.config.seed * 1000 + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> list[dict[str, float]]:
        """Train until ``config.steps``. ``resume``: a checkpoint path/directory, or ``"auto"`` for the
        newest checkpoint in ``out_dir`` if there is one. Returns the logged metrics of this call."""
        plan = self._plan_resume(resume) if self.rank == 0 else (None, None)
        if self.world > 1:  # every rank stops, or none; all resume from what rank 0 chose
            box = [plan]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        resume, problem = plan
        if problem:
            raise ValueError(problem)
        if resume is not None:
            self.load(resume)
        else:
            self._seed()
        if self.rank == 0:
            self._trim_metrics()
        model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            if self._ddp is None:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._ddp = DistributedDataParallel(self.model, device_ids=ids)
            model = self._ddp
        model.train()
        cfg = self.config
        history: list[dict[str, float]] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True, desc=self.model_type)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16
                    else contextlib.nullcontext())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        stop = _StopOnSignal(announce=self.rank == 0)
        with stop, contextlib.closing(bar):
            self._loop(model, bar, autocast, params, history, stop)
        if self.rank == 0:
            report_skipped(self.dataset)
        self.history.extend(history)
        if stop.signum is not None and self.step < cfg.steps:
            raise TrainingInterrupted(stop.signum, self.step, stop.checkpoint)
        return history

    def _loop(self, model, bar, autocast, params, history, stop: "_StopOnSignal") -> None:
        cfg = self.config
        t0, images0 = time.perf_counter(), 0
        for step, batch in self._batches(self.step):
            lr = lr_at(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                out = self.loss_fn(model, batch, step)
            loss = out["loss"]
            if not torch.isfinite(loss):
                last = ckpt_lib.latest_checkpoint(self.out_dir) if self.out_dir is not None else None
                raise FloatingPointError(f"loss is {loss.item()} at step {step}"
                                         + (f"; the newest checkpoint is {last}" if last else ""))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
            self.optimizer.step()
            self.step = step + 1
            images0 += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - t0
                record = {"step": self.step, "lr": lr, "images_per_s": images0 / max(elapsed, 1e-9),
                          **{k: float(torch.as_tensor(v).detach()) for k, v in out.items()}}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if self.rank == 0 and self.out_dir is not None:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    with open(self.out_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
            saved = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
            if saved:
                path = self.save()
            if self._stop_requested(stop) and self.step < cfg.steps:
                stop.checkpoint = path if saved else self.save()  # (every rank calls save, or none)
                return

    def _stop_requested(self, stop: "_StopOnSignal") -> bool:
        """Whether a stop signal arrived (on any rank: all ranks stop after the same step)."""
        if self.world > 1:
            flag = torch.tensor([stop.signum or 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and stop.signum is None:
                stop.signum = int(flag.item())
        return stop.signum is not None


# -- interrupts ------------------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after finishing a step and writing its checkpoint
    (``checkpoint``: its JSON path; None without an ``out_dir``). ``exit_code`` is the shell's
    convention for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (no out_dir)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")


class _StopOnSignal:
    """While active (in the main thread): the first SIGINT or SIGTERM only records ``signum`` (the
    loop finishes its step, saves and stops); a second one raises KeyboardInterrupt at once. Signals
    the process ignores (``SIG_IGN``, e.g. under ``nohup``) stay ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.checkpoint: Path | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:  # os.write: no lock that the interrupted code might hold
            os.write(sys.stderr.fileno(), f"\n{signal.Signals(signum).name}: finishing this step and saving a "
                     "checkpoint (Ctrl-C again to abort without saving)\n".encode())


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave SIGINT to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- model-specific entry points ------------------------------------------------------------------
def dvae_loss(model: nn.Module, batch: Mapping[str, Any], step: int) -> Mapping[str, torch.Tensor]:
    """Loss of a (possibly DDP-wrapped) :class:`~dalle_fast.models.dvae.DVAE` on ``batch["image"]``."""
    return model(batch["image"], step=step)


def clip_loss(model: nn.Module, batch: Mapping[str, Any], step: int) -> Mapping[str, torch.Tensor]:
    """Loss of a (possibly DDP-wrapped) :class:`~dalle_fast.models.clip.CLIP` on ``batch["text_ids"]``, ``batch["image"]``."""
    return model(batch["text_ids"], batch["image"])


class TokenizingCollate:
    """Collate items and add ``text_ids`` (B, text_len) from their captions (picklable for workers)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        captions = [it["caption"] for it in items]
        ids, truncated = self.tokenizer.encode(captions, return_truncated=True)
        if truncated:
            from .tokenizer import TruncationWarning
            warnings.warn(f"{len(truncated)} captions in a batch were truncated to {self.tokenizer.text_len} tokens",
                          TruncationWarning, stacklevel=2)
        return {**image_collate(items), "caption": captions, "text_ids": ids}


def image_collate(items: list[dict]) -> dict:
    """Keep only the images of the items: ``{"image": (B, C, H, W)}``."""
    return {"image": torch.stack([it["image"] for it in items])}


def train_dvae(config, train_config: TrainConfig, dataset: Dataset, out_dir: str | Path | None = None,
               resume: str | Path | None = None, device: str | torch.device | None = None) -> Trainer:
    """Train a :class:`~dalle_fast.models.dvae.DVAE` (``config``: DVAEConfig) on items with an ``image``."""
    from .models.dvae import DVAE
    torch.manual_seed(train_config.seed)
    trainer = Trainer(DVAE(config), dvae_loss, dataset, train_config, out_dir, collate_fn=image_collate,
                      model_type="dvae", model_config=config, device=device)
    trainer.fit(resume)
    return trainer


def train_clip(config, tokenizer, train_config: TrainConfig, dataset: Dataset, out_dir: str | Path | None = None,
               resume: str | Path | None = None, device: str | torch.device | None = None,
               extra_meta: dict | None = None) -> Trainer:
    """Train a :class:`~dalle_fast.models.clip.CLIP` (``config``: CLIPConfig matching ``tokenizer``)
    on items with ``image`` and ``caption``."""
    from .models.clip import CLIP
    if (config.vocab_size, config.pad_base, config.text_len) != (tokenizer.vocab_size, tokenizer.pad_base, tokenizer.text_len):
        raise ValueError("config does not match the tokenizer's vocab_size/pad_base/text_len "
                         "(build it with CLIPConfig.for_tokenizer)")
    torch.manual_seed(train_config.seed)
    extra_meta = {"tokenizer_sha256": tokenizer.fingerprint(), **(extra_meta or {})}
    trainer = Trainer(CLIP(config), clip_loss, dataset, train_config, out_dir, collate_fn=TokenizingCollate(tokenizer),
                      model_type="clip", model_config=config, extra_meta=extra_meta, device=device)
    trainer.fit(resume)
    return trainer


def dalle_loss(model: nn.Module, batch: Mapping[str, Any], step: int) -> Mapping[str, torch.Tensor]:
    """Loss of a (possibly DDP-wrapped) :class:`~dalle_fast.models.dalle.DALLE` on ``batch["text_ids"]``
    ``(B, text_len - 1)`` and ``batch["codes"]`` ``(B, S, S)``."""
    return model(batch["text_ids"], batch["codes"])


def train_dalle(config, train_config: TrainConfig, dataset: Dataset, out_dir: str | Path | None = None,
                resume: str | Path | None = None, device: str | torch.device | None = None,
                extra_meta: dict | None = None) -> Trainer:
    """Train a :class:`~dalle_fast.models.dalle.DALLE` (``config``: DALLEConfig) on items with
    ``text_ids`` and ``codes`` (e.g. :class:`dalle_fast.data.codes.CodesDataset`)."""
    from .models.dalle import DALLE
    torch.manual_seed(train_config.seed)
    trainer = Trainer(DALLE(config), dalle_loss, dataset, train_config, out_dir, model_type="dalle",
                      model_config=config, extra_meta=extra_meta, device=device)
    trainer.fit(resume)
    return trainer


def load_dvae(path: str | Path, device: str | torch.device | None = None):
    """The dVAE checkpoint at ``path`` (file or directory) and its model on ``device``:
    ``(Checkpoint, DVAE)``. The model is the checkpoint just read, not whatever is newest in the
    directory by the time it loads; a checkpoint of another model type is a ValueError."""
    from .models.dvae import DVAE
    ck = ckpt_lib.load_checkpoint(path)  # ValueError for a path without a checkpoint
    dvae = ckpt_lib.load_model(ck.path, device if device is not None else "cpu")
    if not isinstance(dvae, DVAE):
        raise ValueError(f"dvae: {str(path)!r} holds a {type(dvae).__name__}, not a DVAE")
    return ck, dvae


def check_resume_inputs(resume: str | Path | None, out_dir: str | Path, extra_meta: Mapping,
                        flag: str = "resume") -> None:
    """Refuse (ValueError) a ``resume`` ("auto": the newest checkpoint in ``out_dir``, or a checkpoint
    path) whose checkpoint was trained from other inputs than ``extra_meta``'s ``*_sha256`` entries
    name, before any expensive preparation. An unreadable checkpoint passes: the trainer's resume
    reports it."""
    if resume is None:
        return
    ref = ckpt_lib.latest_checkpoint(out_dir) if resume == "auto" else ckpt_lib.resolve_checkpoint(resume)
    try:
        saved = (json.loads(ref.read_text()).get("extra") or {}) if ref is not None else {}
    except (OSError, ValueError, AttributeError):
        saved = {}
    why = inputs_mismatch(saved, extra_meta)
    if why:
        raise ValueError(f"{flag}: checkpoint {ref.name} {why}")


def cached_codes(dvae, tokenizer, dataset: Dataset, text_len: int, cache_dir: str | Path, describe: Mapping,
                 *, batch_size: int = 64, progress: bool = True):
    """``dataset``'s images as ``dvae`` codes with their captions tokenized to ``text_len`` ids, cached
    in ``cache_dir``: rank 0 encodes them unless the cache was made from the same ``describe`` (what
    the codes depend on; any change re-encodes), every rank waits for it and loads the
    :class:`~dalle_fast.data.codes.CodesDataset`."""
    from .data.codes import CodesDataset, encode_dataset
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        encode_dataset(dvae, tokenizer, dataset, text_len, cache_dir, dict(describe), batch_size=batch_size,
                       progress=progress)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return CodesDataset.load(cache_dir)


def prepare_dalle_training(dvae_checkpoint, dvae, tokenizer, dataset: Dataset, out_dir: str | Path, *,
                           preset: str = "tiny", caption_dropout: float = 0.1, resume: str | Path | None = None,
                           data_describe: Mapping | None = None, encode_batch_size: int = 64,
                           progress: bool = True, resume_flag: str = "resume"):
    """What :func:`train_dalle` needs to train on captioned images, as ``dalle-fast train`` runs it:
    ``(config, codes, extra_meta)``.

    ``config``: the DALLEConfig preset ``preset`` sized for ``tokenizer`` and ``dvae``;
    ``dvae_checkpoint`` and ``dvae`` come from :func:`load_dvae`. ``extra_meta`` records the dVAE
    checkpoint file and the hashes of the dVAE and tokenizer (which a resume and
    :func:`dalle_fast.generate.load_pipeline` check); a ``resume`` from other inputs is refused here,
    before the images are encoded. ``codes``: the dataset's codes, cached in ``out_dir/codes``
    (:func:`cached_codes`) keyed by the dVAE, the tokenizer and ``data_describe`` (what the dataset
    was made from). The dVAE is no longer needed afterwards."""
    from .models.dalle import DALLEConfig
    cfg = DALLEConfig.for_tokenizer(tokenizer, preset, image_size=dvae.config.latent_size,
                                    image_vocab=dvae.config.vocab_size, caption_dropout=caption_dropout)
    # the checkpoint file, not its directory (whose newest checkpoint moves on if the dVAE trains further)
    extra_meta = {"dvae_checkpoint": str(Path(dvae_checkpoint.path).resolve()),
                  "dvae_sha256": dvae_checkpoint.meta["weights_sha256"], "tokenizer_sha256": tokenizer.fingerprint()}
    check_resume_inputs(resume, out_dir, extra_meta, resume_flag)  # (every rank: all stop, or none)
    describe = {"dvae_sha256": extra_meta["dvae_sha256"], **(data_describe or {}),
                "tokenizer": extra_meta["tokenizer_sha256"]}
    codes = cached_codes(dvae, tokenizer, dataset, cfg.text_len - 1, Path(out_dir) / "codes", describe,
                         batch_size=encode_batch_size, progress=progress)
    return cfg, codes, extra_meta


def prepare_tokenizer(dataset: Dataset, out_dir: str | Path, path: str | Path | None = None, *,
                      vocab_size: int | None = None, text_len: int | None = None,
                      names: Mapping[str, str] | None = None):
    """The tokenizer a training run in ``out_dir`` uses: the one at ``path`` (which must exist), or
    ``out_dir/tokenizer.json``, trained on ``dataset``'s captions (rank 0) if missing; a copy is kept
    in ``out_dir`` beside the checkpoints (generation reads it). ``vocab_size`` (default 16384) and
    ``text_len`` (default: the longest caption's tokens, at most 256) only shape a tokenizer trained
    here: a warning says when an existing one differs. A ``path`` that differs from the tokenizer of
    a run already in ``out_dir`` is refused. ``names``: how messages call the arguments (the CLI
    passes its flags)."""
    from .checkpoint import list_checkpoints
    from .tokenizer import Tokenizer
    n = {"path": "path", "out_dir": "out_dir", "vocab_size": "vocab_size", "text_len": "text_len", **(names or {})}
    out_dir = Path(out_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{n['path']}: {str(path)!r} is not a file (leave {n['path']} out to train one "
                         f"into {n['out_dir']}/tokenizer.json)")
    path = Path(path) if path is not None else out_dir / "tokenizer.json"
    trained = not path.is_file()
    if trained and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = dataset.captions()
        tok = Tokenizer.train(captions, vocab_size=16384 if vocab_size is None else vocab_size,
                              text_len=256 if text_len is None else text_len)
        if text_len is None:  # as many positions as the longest caption needs: shorter runs, same text
            tok = tok.with_text_len(min(256, max(len(ids) for ids in tok.tokenize(captions))))
        tok.save(path)
    if world > 1:
        dist.barrier()
    tokenizer = Tokenizer.load(path)
    asked = {n["vocab_size"]: (vocab_size, tokenizer.vocab_size), n["text_len"]: (text_len, tokenizer.text_len)}
    ignored = [f"{flag} {want}" for flag, (want, have) in asked.items() if want is not None and want != have]
    if not trained and rank == 0 and ignored:
        warnings.warn(f"using the existing tokenizer {str(path)!r} (vocab_size {tokenizer.vocab_size}, text_len "
                      f"{tokenizer.text_len}); {', '.join(ignored)} only apply to a tokenizer trained here",
                      stacklevel=2)
    copy = out_dir / "tokenizer.json"
    if path.resolve() != copy.resolve():
        if (copy.is_file() and list_checkpoints(out_dir)  # (every rank: all stop, or none)
                and Tokenizer.load(copy).fingerprint() != tokenizer.fingerprint()):
            # the run in out_dir was trained with its tokenizer.json (generate reads it): keep it
            raise ValueError(f"{n['path']}: {str(path)!r} differs from {str(copy)!r}, the tokenizer of the run "
                             f"in {n['out_dir']}; resume with that one, or start a new run in a new {n['out_dir']}")
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(copy)
    return tokenizer
