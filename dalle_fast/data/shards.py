"""WebDataset tar shards (``webdataset`` library): write captioned images, read them back.

A sample is ``{"__key__": "000042", "png": <image bytes>, "txt": caption}``. Shards stream, so data
larger than one machine's disk can be read from shared storage or URLs (``pipe:`` and ``http://``
specs work as in ``webdataset``); each DataLoader worker and each DDP rank reads its own shards
(``wds.split_by_node``, ``wds.split_by_worker``).
"""
from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from .folder import IMAGE_EXTENSIONS, check_image_size, resize_center_crop
from .shapes import to_rgb


def _png_bytes(image: torch.Tensor | Image.Image) -> bytes:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(samples: Iterable[dict], directory: str | Path, max_count: int = 1000,
                 prefix: str = "shard", overwrite: bool = False) -> list[str]:
    """Write ``samples`` (dicts with ``image``: tensor (3, H, W) in [0, 1] or PIL, ``caption``: str)
    as ``directory/prefix-000000.tar, ...`` with at most ``max_count`` samples each. Returns the paths
    written (none for no samples).

    A directory that already holds ``prefix-NNNNNN.tar`` shards is refused (ValueError), so a reader
    of the directory never mixes old and new shards; ``overwrite=True`` deletes them first. If writing
    fails, the shards this call wrote are deleted."""
    if not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard_name = re.compile(re.escape(prefix) + r"-\d{6,}\.tar")
    old = sorted(p for p in directory.iterdir() if shard_name.fullmatch(p.name))
    if old and not overwrite:
        raise ValueError(f"directory {str(directory)!r} already holds {len(old)} {prefix}-*.tar shards; "
                         "pass overwrite=True to replace them")
    for p in old:
        p.unlink()
    pattern = str(directory / f"{prefix}-%06d.tar")
    written: list[str] = []
    count = 0
    try:
        with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
            written.append(sink.fname)  # the writer creates its first shard at once
            for i, sample in enumerate(samples):
                if not isinstance(sample, dict) or "image" not in sample or not isinstance(sample.get("caption"), str):
                    raise ValueError(f"samples[{i}] needs an 'image' and a str 'caption'")
                sink.write({"__key__": f"{i:09d}", "png": _png_bytes(sample["image"]), "txt": sample["caption"]})
                count += 1
                if sink.fname != written[-1]:
                    written.append(sink.fname)
    except BaseException:
        count = 0
        raise
    finally:
        if not count:  # failed, or no samples: leave no (partial or empty) shard behind
            for p in written:
                Path(p).unlink(missing_ok=True)
    return written if count else []


def _decode_image(key: str, data: bytes) -> Image.Image | None:
    """Image bytes -> PIL image in its own mode (``resize_center_crop`` converts it, 16-bit included)."""
    if "." + key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
        return None
    img = Image.open(io.BytesIO(data))
    check_image_size(img)  # before decoding: a huge or absurd image is skipped unread
    img.load()
    return img


def shard_dataset(urls: str | list[str], size: int, shuffle: int = 0, seed: int = 0) -> wds.WebDataset:
    """Iterable dataset over shards: yields ``{"image": (3, size, size) float, "caption": str, "key": str}``.

    ``urls``: brace pattern (``"data/shard-{000000..000009}.tar"``) or a list. ``shuffle``: sample
    shuffle buffer (0 = file order). Corrupt samples, and images over the pixel and aspect caps of
    :func:`~.folder.check_image_size`, are skipped with a warning (``wds.warn_and_continue``). Shards are split across DDP ranks and DataLoader workers.
    """
    def to_item(sample: dict) -> dict:
        return {"image": resize_center_crop(sample["image"], size), "caption": sample["caption"], "key": sample["__key__"]}

    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                        workersplitter=wds.split_by_worker, handler=wds.warn_and_continue, seed=seed)
    if shuffle:
        ds = ds.shuffle(shuffle)
    return (ds.decode(_decode_image, handler=wds.warn_and_continue)
              .rename(image="png;jpg;jpeg;webp", caption="txt", handler=wds.warn_and_continue)
              .map(to_item, handler=wds.warn_and_continue))
