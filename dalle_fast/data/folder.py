"""Image-folder dataset: ``name.jpg|png|...`` beside ``name.txt`` (one caption per line).

Each access picks one caption line at random, as a pure function of ``(seed, epoch, index)``
(call :meth:`ImageFolderDataset.set_epoch`), and resizes the image (shorter side to ``size``, then a
centre crop). Files that cannot be used (no or empty caption file, unreadable or corrupt image) are
skipped with a warning and counted in :attr:`ImageFolderDataset.skipped`; a long run never crashes
on one bad file.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .shapes import pil_to_tensor, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SkippedFileWarning(UserWarning):
    """A dataset file was unusable and skipped."""


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image (any mode, see :func:`~.shapes.to_rgb`) -> (3, size, size) float tensor in [0, 1]:
    shorter side to ``size``, centre crop."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return pil_to_tensor(img.crop((left, top, left + size, top + size)))


def read_captions(path: Path) -> list[str]:
    """Non-empty, stripped lines of a caption file."""
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item ``i`` -> ``{"image": (3, size, size) float in [0, 1], "caption": str, "path": str}``.

    ``root`` is searched recursively. ``skipped`` counts unusable files by reason
    (``missing_caption``, ``empty_caption``, ``corrupt_image``); with DataLoader workers the image
    counts accumulate in the workers' copies.
    """

    def __init__(self, root: str | Path, size: int = 256, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a directory")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.root, self.size, self.seed, self.epoch = root, size, int(seed), 0
        self.skipped: Counter[str] = Counter()
        self.items: list[tuple[Path, list[str]]] = []
        self._bad: set[int] = set()
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                self._skip("missing_caption", path)
                continue
            captions = read_captions(txt)
            if not captions:
                self._skip("empty_caption", path)
                continue
            self.items.append((path, captions))
        if not self.items:
            raise ValueError(f"root {str(root)!r} holds no image with a caption file ({dict(self.skipped)} skipped)")

    def _skip(self, reason: str, path: Path, detail: str = "") -> None:
        self.skipped[reason] += 1
        warnings.warn(f"skipping {path} ({reason}{': ' + detail if detail else ''})", SkippedFileWarning, stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        """Caption choice depends on the epoch (set it before each epoch for fresh captions)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        """Every caption line of every image (e.g. to train a tokenizer)."""
        return [c for _, caps in self.items for c in caps]

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of length {n}")
        index %= n
        for offset in range(n):  # a corrupt file is replaced by the next usable one
            i = (index + offset) % n
            if i in self._bad:
                continue
            path, captions = self.items[i]
            try:
                with Image.open(path) as img:
                    image = resize_center_crop(img, self.size)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                self._bad.add(i)
                self._skip("corrupt_image", path, str(err))
                continue
            rng = np.random.default_rng([self.seed, self.epoch, i])
            return {"image": image, "caption": captions[int(rng.integers(len(captions)))], "path": str(path)}
        raise ValueError(f"every image under {self.root} is unreadable ({dict(self.skipped)})")
