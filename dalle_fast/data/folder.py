"""Image-folder dataset: ``name.jpg|png|...`` beside ``name.txt`` (one caption per line).

Each access picks one caption line at random, as a pure function of ``(seed, epoch, index)``
(call :meth:`ImageFolderDataset.set_epoch`), and takes the image's centre square, resized to
``size`` (the resize never makes an image larger than its input or output). Files that cannot be
used are skipped with a warning and counted by reason in :attr:`ImageFolderDataset.skipped`
(:meth:`ImageFolderDataset.skip_summary` says it in one line): no or empty or unreadable caption
file, an image that fails to decode (any error, running out of memory included), one with more than
``max_pixels`` pixels (checked from its header, before decoding) or one whose sides differ by more
than ``max_aspect``. A long run never ends on one bad file.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .shapes import pil_to_tensor, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Default decoded-pixel cap (an 8192 x 8192 image): larger images are skipped unread.
MAX_PIXELS = 8192 * 8192
#: Default cap on longer side / shorter side: a 1 x 20000 strip's centre square is one pixel.
MAX_ASPECT = 20.0
# why an image was skipped when read (codes of ImageFolderDataset's shared status array)
_LOAD_REASONS = ("corrupt_image", "too_many_pixels", "extreme_aspect", "out_of_memory")


class SkippedFileWarning(UserWarning):
    """A dataset file was unusable and skipped."""


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image (any mode, see :func:`~.shapes.to_rgb`) -> (3, size, size) float tensor in [0, 1]:
    the centre square (side = the shorter side), resized to ``size``. Crop first: no intermediate
    image is larger than the input or the output, whatever the aspect ratio."""
    w, h = img.size
    side = min(w, h)
    if side < 1:
        raise ValueError(f"image has no pixels ({w} x {h})")
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (side, side):
        img = img.crop((left, top, left + side, top + side))
    img = to_rgb(img)
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return pil_to_tensor(img)


class ImageRejected(ValueError):
    """An image file is not used; ``reason`` is one of ``too_many_pixels``, ``extreme_aspect``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_image_size(img: Image.Image, max_pixels: Optional[int] = MAX_PIXELS,
                     max_aspect: Optional[float] = MAX_ASPECT) -> None:
    """ImageRejected if the (opened, not yet decoded) image has more than ``max_pixels`` pixels or
    sides in a ratio beyond ``max_aspect`` (None: no limit)."""
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected("too_many_pixels", f"{w} x {h} pixels, more than max_pixels={max_pixels}")
    if max_aspect is not None and max(w, h) > max_aspect * max(1, min(w, h)):
        raise ImageRejected("extreme_aspect", f"{w} x {h} pixels, sides in a ratio beyond max_aspect={max_aspect:g}")


def read_captions(path: Path) -> list[str]:
    """Non-empty, stripped lines of a caption file."""
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item ``i`` -> ``{"image": (3, size, size) float in [0, 1], "caption": str, "path": str}``.

    ``root`` is searched recursively. An unusable file is skipped with a :class:`SkippedFileWarning`
    (an unusable image is replaced by the next usable one) and counted in :attr:`skipped` by reason:
    ``missing_caption``, ``empty_caption``, ``unreadable_caption`` (found when the folder is
    scanned), ``corrupt_image`` (fails to decode), ``too_many_pixels`` (more than ``max_pixels``),
    ``extreme_aspect`` (sides in a ratio beyond ``max_aspect``), ``out_of_memory``. Images found bad
    by DataLoader workers are counted here too (a shared-memory status per file).
    """

    def __init__(self, root: str | Path, size: int = 256, seed: int = 0, *, max_pixels: Optional[int] = MAX_PIXELS,
                 max_aspect: Optional[float] = MAX_ASPECT) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a directory")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
        if max_aspect is not None and not (isinstance(max_aspect, (int, float)) and 1 <= max_aspect < float("inf")):
            raise ValueError(f"max_aspect must be a number >= 1 or None, got {max_aspect!r}")
        self.root, self.size, self.seed, self.epoch = root, size, int(seed), 0
        self.max_pixels, self.max_aspect = max_pixels, max_aspect
        self._scan_skipped: Counter[str] = Counter()
        self.items: list[tuple[Path, list[str]]] = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            txt = path.with_suffix(".txt")
            if not txt.is_file() and not txt.exists():
                self._skip("missing_caption", path)
                continue
            try:
                captions = read_captions(txt)
            except OSError as err:
                self._skip("unreadable_caption", path, f"{txt.name}: {err.strerror or err}")
                continue
            if not captions:
                self._skip("empty_caption", path)
                continue
            self.items.append((path, captions))
        if not self.items:
            raise ValueError(f"root {str(root)!r} holds no image with a caption file "
                             f"({dict(self._scan_skipped)} skipped)")
        # per item: 0 usable so far, else 1 + the index of its reason in _LOAD_REASONS; in shared
        # memory so that what DataLoader workers find is seen here (and each file is read bad once)
        self._status = torch.zeros(len(self.items), dtype=torch.int8).share_memory_()

    @property
    def skipped(self) -> Counter:
        """Unusable files found so far, by reason (see the class docstring)."""
        counts = Counter(self._scan_skipped)
        found = torch.bincount(self._status.long(), minlength=len(_LOAD_REASONS) + 1).tolist()
        for reason, n in zip(_LOAD_REASONS, found[1:]):
            if n:
                counts[reason] += n
        return counts

    def skip_summary(self) -> Optional[str]:
        """One line, e.g. ``skipped 3 of 1000 image files: 2 corrupt_image, 1 too_many_pixels``;
        None when nothing was skipped."""
        counts = self.skipped
        if not counts:
            return None
        total = len(self.items) + sum(self._scan_skipped.values())
        return (f"skipped {sum(counts.values())} of {total} image files: "
                + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())))

    def _skip(self, reason: str, path: Path, detail: str = "") -> None:
        self._scan_skipped[reason] += 1
        _warn_skip(reason, path, detail)

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
        for offset in range(n):  # an unusable file is replaced by the next usable one
            i = (index + offset) % n
            if self._status[i]:
                continue
            path, captions = self.items[i]
            try:
                image = self._load(path)
            except MemoryError:
                self._reject(i, "out_of_memory", path, "")
                continue
            except ImageRejected as err:
                self._reject(i, err.reason, path, str(err).split(": ", 1)[1])
                continue
            except Exception as err:  # noqa: BLE001  (decoders raise many kinds; one file never ends a run)
                self._reject(i, "corrupt_image", path, f"{type(err).__name__}: {err}")
                continue
            rng = np.random.default_rng([self.seed, self.epoch, i])
            return {"image": image, "caption": captions[int(rng.integers(len(captions)))], "path": str(path)}
        raise ValueError(f"every image under {self.root} is unreadable or unusable ({dict(self.skipped)})")

    def _load(self, path: Path) -> torch.Tensor:
        with warnings.catch_warnings():
            # PIL warns about large images at open: the pixel cap below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_image_size(img, self.max_pixels, self.max_aspect)
                return resize_center_crop(img, self.size)

    def _reject(self, i: int, reason: str, path: Path, detail: str) -> None:
        self._status[i] = 1 + _LOAD_REASONS.index(reason)
        _warn_skip(reason, path, detail)


def _warn_skip(reason: str, path: Path, detail: str) -> None:
    warnings.warn(f"skipping {path} ({reason}{': ' + detail if detail else ''})", SkippedFileWarning, stacklevel=4)
