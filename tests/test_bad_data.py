"""One bad file never ends a run: absurd, huge, corrupt or unreadable images are skipped and counted
by reason (also across DataLoader workers), the resize is bounded by the crop, and a summary of what
was skipped is printed once at the end of data loading."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_fast.data import folder as folder_mod
from dalle_fast.data.folder import ImageFolderDataset, SkippedFileWarning, resize_center_crop
from dalle_fast.data.shapes import ShapesDataset


def write_folder(root, n=6, size=24):
    d = ShapesDataset(size=size, length=n, seed=0)
    for i in range(n):
        Image.fromarray((d[i]["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"{d[i]['caption']}\n")
    return d


def add(root, name, image, caption="a caption"):
    image.save(root / f"{name}.png")
    (root / f"{name}.txt").write_text(caption)


def test_resize_is_bounded_by_the_crop(monkeypatch):
    """The whole image was resized so that its shorter side became the target size before the crop:
    a 60 KB PNG of 1 x 20000 pixels at size 256 allocated 5.2 GB. No intermediate image may now be
    larger than the input or the output."""
    sizes = []
    original = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    for w, h in ((3, 3000), (3000, 3), (40, 90), (64, 64), (500, 80)):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
        out = resize_center_crop(img, 64)
        assert out.shape == (3, 64, 64) and 0 <= out.min() and out.max() <= 1
        for size in sizes:
            assert size[0] * size[1] <= max(w * h, 64 * 64), ((w, h), size)
        sizes.clear()
    # the centre crop is kept: the middle of a wide image, not its left edge
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255
    assert resize_center_crop(Image.fromarray(wide), 10).min() == 1.0


def test_absurd_huge_and_failing_images_are_skipped_and_counted(tmp_path, monkeypatch):
    write_folder(tmp_path, n=4)
    add(tmp_path, "needle", Image.new("RGB", (1, 20000), "red"))        # 1 x 20000: absurd aspect
    add(tmp_path, "huge", Image.new("L", (300, 300)))                    # over max_pixels below
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "corrupt.txt").write_text("caption")
    add(tmp_path, "oom", Image.new("RGB", (8, 8)))
    real = folder_mod.resize_center_crop

    def failing(img, size):  # what a decoder running out of memory does
        if img.size == (8, 8):
            raise MemoryError
        return real(img, size)

    monkeypatch.setattr(folder_mod, "resize_center_crop", failing)
    ds = ImageFolderDataset(tmp_path, size=16, max_pixels=200 * 200)
    with pytest.warns(SkippedFileWarning):
        items = [ds[i] for i in range(len(ds))]
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    assert {Path(it["path"]).stem for it in items} == {f"img{i}" for i in range(4)}
    assert ds.skipped == {"extreme_aspect": 1, "too_many_pixels": 1, "corrupt_image": 1, "out_of_memory": 1}
    assert ds.skip_summary() == ("skipped 4 of 8 image files: 1 corrupt_image, 1 extreme_aspect, "
                                 "1 out_of_memory, 1 too_many_pixels")


def test_unreadable_caption_file_is_skipped(tmp_path):
    write_folder(tmp_path, n=3)
    (tmp_path / "img1.txt").unlink()
    (tmp_path / "img1.txt").mkdir()  # reading it raises IsADirectoryError
    with pytest.warns(SkippedFileWarning, match="unreadable_caption"):
        ds = ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 2 and ds.skipped == {"unreadable_caption": 1}


def test_skips_in_dataloader_workers_are_counted(tmp_path):
    write_folder(tmp_path, n=6)
    for i in (1, 4):
        (tmp_path / f"img{i}.png").write_bytes(b"broken")
    ds = ImageFolderDataset(tmp_path, size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda items: items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [it["path"] for batch in loader for it in batch]
    assert len(got) == 6 and not any("img1.png" in p or "img4.png" in p for p in got)
    assert ds.skipped == {"corrupt_image": 2}  # counted in the workers, seen here
    assert ds.skip_summary() == "skipped 2 of 6 image files: 2 corrupt_image"


def test_nothing_skipped_has_no_summary(tmp_path):
    write_folder(tmp_path, n=2)
    ds = ImageFolderDataset(tmp_path, size=16)
    [ds[i] for i in range(2)]
    assert ds.skipped == {} and ds.skip_summary() is None


def test_every_trainer_finishes_on_a_folder_with_bad_images(tmp_path, capsys):
    """dVAE, CLIP and transformer training (the CLI) on a folder holding an absurd strip, a corrupt
    file and an image without a caption: each finishes and reports what it skipped once."""
    from dalle_fast import checkpoint as ck
    from dalle_fast.cli import main
    data = tmp_path / "data"
    data.mkdir()
    write_folder(data, n=8, size=32)
    add(data, "needle", Image.new("RGB", (1, 20000), "red"))
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "corrupt.txt").write_text("caption")
    Image.new("RGB", (8, 8)).save(data / "nocaption.png")
    common = ["--data", str(data), "--batch-size", "4", "--no-progress", "--device", "cpu"]
    summary = "data: skipped 3 of 11 image files: 1 corrupt_image, 1 extreme_aspect, 1 missing_caption"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        assert main(["train-vae", "--steps", "3", "--image-size", "16", "--out", str(tmp_path / "dvae")] + common) == 0
        assert capsys.readouterr().err.count(summary) == 1
        assert main(["train-clip", "--steps", "3", "--out", str(tmp_path / "clip"), "--vocab-size", "300",
                     "--text-len", "16"] + common) == 0
        assert capsys.readouterr().err.count(summary) == 1
        assert main(["train", "--dvae", str(tmp_path / "dvae"), "--tokenizer", str(tmp_path / "clip" / "tokenizer.json"),
                     "--steps", "2", "--out", str(tmp_path / "dalle")] + common) == 0
        assert capsys.readouterr().err.count(summary) == 1
    for name in ("dvae", "clip", "dalle"):
        assert ck.latest_checkpoint(tmp_path / name) is not None
