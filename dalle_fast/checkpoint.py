"""Atomic, pickle-free training checkpoints.

A checkpoint at step ``n`` is two files in one directory:

* ``checkpoint-0000000n.safetensors``: model weights (``model.<name>``) and optimizer state tensors
  (``optimizer.<param index>.<name>``);
* ``checkpoint-0000000n.json``: model type and config, step, train config, optimizer param groups,
  RNG states of every rank (base64 / lists) and the SHA-256 of the weights file.

Each file is written to a temporary file in the same directory, flushed, fsynced and moved into place
with ``os.replace``; the JSON is written last, so a JSON file's presence means its checkpoint is
complete. Nothing is pickled.

A process killed while writing leaves only a hidden temporary file (``.checkpoint-....tmp``), which
:func:`remove_stale_temp_files` deletes. A checkpoint that fails to load (truncated, hand-edited,
damaged on disk) can be set aside with :func:`quarantine_checkpoint` (renamed ``*.damaged``, kept);
:func:`newest_verified_checkpoint` finds the newest one that loads.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .masks import _positive_int

FORMAT = "dalle_fast.checkpoint"
_NAME_RE = re.compile(r"checkpoint-(\d{8,})\.json")
# atomic_write's temporary files (mkstemp: ".<name>.<8 random chars>.tmp") of the files a training
# run writes: checkpoints and its metrics log
_TEMP_RE = re.compile(r"\.(checkpoint-\d{8,}\.(json|safetensors)|metrics\.jsonl)\.[A-Za-z0-9_]{8}\.tmp")
DAMAGED_SUFFIX = ".damaged"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# -- RNG state -----------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_state() -> dict[str, Any]:
    """JSON-serialisable state of the torch (CPU and CUDA), numpy and Python generators."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- optimizer state -----------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[name] = value
    groups = [{k: _json_safe(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta["state"].items():
        state.setdefault(int(pid), {}).update(extra)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- save / load ---------------------------------------------------------------------------------
def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer of this module left in ``directory`` (checkpoint
    and metrics-log temporaries only; nothing else) and return them. Call it only while no other
    process writes checkpoints there (a run starting or resuming)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if _TEMP_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return sorted(removed)


def quarantine_checkpoint(path: str | Path) -> list[Path]:
    """Set a damaged checkpoint aside, keeping it: its weights file and then its JSON are renamed
    ``<name>.damaged`` (``.damaged-2``, ... if taken), so that listing, resuming and pruning no
    longer see it. Returns the new paths."""
    path = Path(path)
    moved = []
    for p in (path.with_suffix(".safetensors"), path):
        if not p.exists():
            continue
        target, n = p.with_name(p.name + DAMAGED_SUFFIX), 1
        while target.exists():
            n += 1
            target = p.with_name(f"{p.name}{DAMAGED_SUFFIX}-{n}")
        os.replace(p, target)
        moved.append(target)
    return moved


def newest_verified_checkpoint(directory: str | Path, newer_than: int = -1
                               ) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``directory`` that loads and verifies (None if none does), and the
    newer ones that failed, newest first, each with why (its ValueError). Stops at the first
    checkpoint not newer than step ``newer_than``."""
    damaged = []
    for path in reversed(list_checkpoints(directory)):
        if int(_NAME_RE.fullmatch(path.name)[1]) <= newer_than:
            break
        try:
            return load_checkpoint(path), damaged
        except ValueError as err:
            damaged.append((path, str(err)))
    return None, damaged


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a checkpoint file name (``checkpoint-00000042.json`` -> 42), or None."""
    m = _NAME_RE.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """JSON path of the checkpoint at ``step``."""
    return Path(directory) / f"checkpoint-{step:08d}.json"


def save_checkpoint(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, model_type: str = "model", model_config: Any = None, rng: list[dict] | None = None,
                    extra: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring); returns its JSON path.

    ``model_config``: a dataclass or dict (stored as JSON). ``rng``: per-rank RNG states (default: this
    process's). ``keep``: delete all but the newest ``keep`` (>= 1) checkpoints afterwards.
    """
    if keep is not None:
        _positive_int("keep", keep)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_meta = None
    if optimizer is not None:
        opt_tensors, optim_meta = _split_optimizer_state(optimizer.state_dict())
        tensors.update(opt_tensors)
    blob = st_save(tensors, metadata={"format": FORMAT})
    json_path = checkpoint_path(directory, step)
    weights = json_path.with_suffix(".safetensors")
    atomic_write(weights, blob)
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    meta = {
        "format": FORMAT, "version": 1, "step": step, "model_type": model_type, "model_config": model_config,
        "weights": weights.name, "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "optimizer": optim_meta, "rng": rng if rng is not None else [get_rng_state()], "extra": extra or {},
    }
    atomic_write(json_path, json.dumps(meta).encode())
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    return json_path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (JSON paths) in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME_RE.fullmatch(p.name)), key=lambda p: int(_NAME_RE.fullmatch(p.name)[1]))


def remove_checkpoints(directory: str | Path) -> int:
    """Delete every checkpoint (JSON and weights) in ``directory``, nothing else; returns how many."""
    found = list_checkpoints(directory)
    for old in found:
        old.unlink(missing_ok=True)  # the JSON first: a checkpoint without it is never listed
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return len(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The JSON path a checkpoint reference names: the file itself, the JSON beside a
    ``.safetensors`` file, or the newest checkpoint of a directory (ValueError if none)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"path {str(path)!r} holds no checkpoint")
        path = found
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a checkpoint file")
    return path


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: ``meta`` (the JSON), ``model_state`` and ``optimizer_state`` (or None),
    read from ``path`` (the JSON file)."""
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    path: Path | None = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _check_meta(path: Path, meta: dict) -> None:
    """ValueError naming ``path`` for a field of the JSON the loaders would trip over."""
    def bad(what):
        raise ValueError(f"checkpoint {str(path)!r}: {what} (truncated or hand-edited file)")

    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        bad(f"step must be an int >= 0, got {step!r}")
    for key in ("model_type", "weights", "weights_sha256"):
        if not isinstance(meta[key], str):
            bad(f"{key} must be a string, got {meta[key]!r}")
    if Path(meta["weights"]).name != meta["weights"] or meta["weights"] in ("", ".", ".."):
        bad(f"weights must name a file beside the JSON, got {meta['weights']!r}")
    for key, types in (("model_config", (dict, type(None))), ("optimizer", (dict, type(None))),
                       ("rng", (list, type(None))), ("extra", (dict, type(None)))):
        if not isinstance(meta.get(key), types):
            bad(f"{key} must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                f"got {type(meta.get(key)).__name__}")
    optim = meta.get("optimizer")
    if optim is not None and not (isinstance(optim.get("param_groups"), list) and isinstance(optim.get("state"), dict)):
        bad("optimizer must hold a list 'param_groups' and a dict 'state'")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint by its JSON path, or the newest one in a directory. Verifies the weights
    hash. Every failure to read it is a ValueError naming the file."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"path {str(path)!r} is not a readable checkpoint: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"path {str(path)!r} is not a dalle_fast checkpoint")
    missing = [k for k in ("step", "model_type", "weights", "weights_sha256") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {', '.join(missing)} (truncated or hand-edited file)")
    _check_meta(path, meta)
    weights = path.parent / meta["weights"]
    try:
        blob = weights.read_bytes()
    except OSError as err:
        raise ValueError(f"weights of checkpoint {str(path)!r} cannot be read ({weights}: {err.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"weights of {str(path)!r} do not match their recorded SHA-256 (corrupt file)")
    try:
        tensors = st_load(blob)
    except Exception as err:  # noqa: BLE001  (safetensors raises its own SafetensorError, and others)
        raise ValueError(f"weights of checkpoint {str(path)!r} ({weights.name}) are not a valid safetensors "
                         f"file: {err}") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = None
    if meta.get("optimizer") is not None:
        try:
            optim = _join_optimizer_state({k: v for k, v in tensors.items() if k.startswith("optimizer.")},
                                          meta["optimizer"])
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"checkpoint {str(path)!r}: its optimizer state does not read back "
                             f"({type(err).__name__}: {err})") from None
    return Checkpoint(meta, model_state, optim, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a checkpoint whose ``model_type`` is registered (``dvae``, ``clip``,
    or one added with :func:`register_model_type`), in eval mode."""
    ckpt = load_checkpoint(path)
    model_type = ckpt.meta["model_type"]
    if model_type not in MODEL_TYPES:
        raise ValueError(f"checkpoint model_type {model_type!r} is not registered ({sorted(MODEL_TYPES)})")
    model_cls, config_cls = MODEL_TYPES[model_type]
    try:
        config = config_cls(**ckpt.meta["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: its {model_type} config does not build: {err}") from None
    model = model_cls(config)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: weights do not fit its {model_type} config: "
                         f"{str(err).splitlines()[0]}") from None
    return model.to(map_location).eval()


MODEL_TYPES: dict[str, tuple[type, type]] = {}


def register_model_type(name: str, model_cls: type, config_cls: type) -> None:
    """Let :func:`load_model` rebuild ``model_cls(config_cls(**model_config))`` for ``name``."""
    MODEL_TYPES[name] = (model_cls, config_cls)


def _register_builtin() -> None:
    from .models.clip import CLIP, CLIPConfig
    from .models.dalle import DALLE, DALLEConfig
    from .models.dvae import DVAE, DVAEConfig
    register_model_type("dvae", DVAE, DVAEConfig)
    register_model_type("clip", CLIP, CLIPConfig)
    register_model_type("dalle", DALLE, DALLEConfig)


_register_builtin()
