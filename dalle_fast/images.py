"""Image grids: candidates written as one PNG, for ``dalle-fast generate`` and ``dalle-fast demo``."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["VIEW_SIZE", "save_grid"]

VIEW_SIZE = 128  # grids are also written with each image upscaled to at least this many pixels


def save_grid(images, path: Path, columns: int | None = None) -> Path:
    """Write ``images`` ``(N, C, H, W)`` in [0, 1] as one PNG grid (2 px gaps) at ``path``, with each
    image scaled up by a whole factor (nearest neighbour) to at least :data:`VIEW_SIZE` pixels, and
    at the original size as ``<stem>-1x.png`` beside it; returns the path of the original-size grid."""
    import numpy as np
    from PIL import Image
    n, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    original = path.with_name(f"{path.stem}-1x{path.suffix}")
    image = Image.fromarray(grid)
    image.save(original)
    factor = max(1, math.ceil(VIEW_SIZE / min(h, w)))
    image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST).save(path)
    return original
