"""On-disk cache of the Triton tuner's choices, so that a new process (another training run, every
rank of a multi-GPU job) launches the configuration tuned before instead of timing every candidate
again, and picks the same one (same tiles, same floating-point results).

One JSON file, ``$DALLE_FAST_CACHE_DIR/triton_tuning.json`` (default ``~/.cache/dalle_fast``).
An entry is keyed by the device (name and compute capability), the Triton and dalle_fast versions,
a hash of the kernel source and of the candidate list, and the problem key; any change to those
makes a new entry. ``DALLE_FAST_TUNING_CACHE=0`` turns the cache off. The cache is best effort: an
unreadable or corrupt file is ignored with one warning (and replaced on the next store), a failed
write warns once, neither stops a run. Writes go through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton

from ..version import __version__

__all__ = ["cache_file", "device_model", "enabled", "lookup", "store"]

_SOURCE_HASH = hashlib.sha256(Path(__file__).with_name("sparse_attention.py").read_bytes()).hexdigest()[:16]
_WARNED: set = set()


def enabled() -> bool:
    return os.environ.get("DALLE_FAST_TUNING_CACHE", "1") not in ("0", "")


def cache_file() -> Path:
    root = os.environ.get("DALLE_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dalle_fast")
    return Path(root) / "triton_tuning.json"


def _warn_once(what: str, err: Exception) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"dalle_fast: Triton tuning cache {cache_file()}: {what} ({type(err).__name__}: {err}); "
                      "tuning in memory only", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def device_model(device: torch.device) -> str:
    """The kind of GPU (name and compute capability) a tuned choice holds for; the device type for
    the interpreter."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def _device_tag(device: torch.device) -> str:
    return f"{device_model(device)}|triton {triton.__version__}|dalle_fast {__version__}|{_SOURCE_HASH}"


def _entry_key(name: str, key: tuple, device: torch.device, candidates: Sequence) -> str:
    cands = hashlib.sha256(repr([tuple(c) for c in candidates]).encode()).hexdigest()[:12]
    problem = "|".join(str(x).replace("torch.", "") for x in key)
    return f"{_device_tag(device)}|{cands}|{problem}"


def _read() -> dict:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once("unreadable, ignored", e)
        return {}
    if not isinstance(data, dict):
        _warn_once("not a JSON object, ignored", ValueError(type(data).__name__))
        return {}
    return data


def lookup(name: str, key: tuple, device: torch.device, candidates: Sequence,
           base: Optional[Callable[[tuple], Optional[tuple]]] = None) -> Optional[tuple]:
    """The stored choice, as the tuple of its ``TileConfig`` fields, if it is one of
    ``candidates`` or ``base(choice)`` is (a variant the tuner derived from a candidate; ``base``
    returns None for a malformed choice); else None."""
    if not enabled():
        return None
    hit = _read().get(_entry_key(name, key, device, candidates))
    if not (isinstance(hit, list) and all(isinstance(x, int) for x in hit)):
        return None
    hit = tuple(hit)
    allowed = {tuple(c) for c in candidates}
    return hit if hit in allowed or (base is not None and base(hit) in allowed) else None


def store(name: str, key: tuple, device: torch.device, candidates: Sequence, config: tuple) -> None:
    """Adds one choice (merged into what another process may have written meanwhile)."""
    if not enabled():
        return
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read()
        data[_entry_key(name, key, device, candidates)] = list(config)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".triton_tuning.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _warn_once("cannot be written", e)
