"""Pre-encoded transformer training data: dVAE codes (uint16) and caption ids, cached on disk.

The dVAE runs over the image dataset once (:func:`encode_dataset`); ``codes.npy`` ``(N, s, s)``
uint16 and ``text.npy`` ``(N, text_len - 1)`` int32 are written beside a ``meta.json`` that records
what they were made from (dVAE weights hash, dataset description, tokenizer), so a later run with
the same inputs loads them instead of encoding again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class CodesDataset(Dataset):
    """Item ``i`` -> ``{"text_ids": (text_len - 1,) int64, "codes": (s, s) int64}`` from the arrays."""

    def __init__(self, codes: np.ndarray, text: np.ndarray) -> None:
        if codes.ndim != 3 or text.ndim != 2 or len(codes) != len(text):
            raise ValueError(f"codes must be (N, s, s) and text (N, L) with the same N, got {codes.shape}, {text.shape}")
        self.codes, self.text = codes, text

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict:
        return {"text_ids": torch.from_numpy(self.text[index].astype(np.int64)),
                "codes": torch.from_numpy(self.codes[index].astype(np.int64))}

    @classmethod
    def load(cls, directory: str | Path) -> "CodesDataset":
        d = Path(directory)
        return cls(np.load(d / "codes.npy", mmap_mode="r"), np.load(d / "text.npy", mmap_mode="r"))


def data_fingerprint(root: str | Path) -> str:
    """SHA-256 over the relative path, size and modification time of every file under ``root``: an
    added, removed, replaced or edited image or caption changes it (without reading the files)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_meta(path: Path) -> Any:
    """The cache record, or None if missing or unreadable (a cache miss: encode again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.no_grad()
def encode_dataset(dvae, tokenizer, dataset: Dataset, text_len: int, directory: str | Path, describe: dict[str, Any],
                   batch_size: int = 64, progress: bool = True) -> CodesDataset:
    """Encode every ``{"image", "caption"}`` item of ``dataset`` with ``dvae`` (codes as uint16) and
    tokenize its caption to ``text_len`` ids, or load the cache in ``directory`` if ``describe``
    (any JSON-able description of the inputs) matches the one it was written with."""
    d = Path(directory)
    meta = {"describe": describe, "length": len(dataset), "text_len": text_len}
    meta_path = d / "meta.json"
    if _read_meta(meta_path) == meta:
        return CodesDataset.load(d)
    if dvae.config.vocab_size > 2 ** 16:
        raise ValueError(f"a codebook of {dvae.config.vocab_size} entries does not fit uint16 codes")
    d.mkdir(parents=True, exist_ok=True)
    s = dvae.config.latent_size
    codes = np.empty((len(dataset), s, s), dtype=np.uint16)
    text = np.empty((len(dataset), text_len), dtype=np.int32)
    device = next(dvae.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda items: items)
    i = 0
    for items in tqdm(loader, disable=not progress, desc="encode", unit="batch"):
        images = torch.stack([it["image"] for it in items]).to(device)
        codes[i:i + len(items)] = dvae.encode(images).cpu().numpy().astype(np.uint16)
        text[i:i + len(items)] = tokenizer.encode([it["caption"] for it in items], text_len=text_len).numpy()
        i += len(items)
    # the record goes first and comes back last: a run killed in between leaves no record that
    # could match arrays from two different encodings
    meta_path.unlink(missing_ok=True)
    _save_npy(d / "codes.npy", codes)
    _save_npy(d / "text.npy", text)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)
    report_skipped(dataset)
    return CodesDataset.load(d)


def report_skipped(dataset: Dataset) -> None:
    """Print, once data loading is done, the dataset's summary of the files it skipped (datasets
    with a ``skip_summary()``, e.g. ImageFolderDataset), if any, to stderr."""
    summary = dataset.skip_summary() if hasattr(dataset, "skip_summary") else None
    if summary:
        print(f"data: {summary}", file=sys.stderr, flush=True)
