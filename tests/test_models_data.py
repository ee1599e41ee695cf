"""Datasets: shapes determinism, hold-out, scorer; image folder skipping; tar shards."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_fast.data import shapes
from dalle_fast.data.folder import ImageFolderDataset, SkippedFileWarning
from dalle_fast.data.shapes import (
    COLOURS,
    ShapesDataset,
    parse_caption,
    parse_holdout,
    perturb,
    pil_to_tensor,
    render,
    score,
)
from dalle_fast.data.shards import shard_dataset, write_shards


def test_shapes_deterministic():
    a, b = ShapesDataset(size=32, length=50, seed=3), ShapesDataset(size=32, length=50, seed=3)
    for i in (0, 7, 49):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["image"], a[i]["image"])
    c = ShapesDataset(size=32, length=50, seed=4)
    assert [a[i]["caption"] for i in range(20)] != [c[i]["caption"] for i in range(20)]
    # the scene does not depend on the resolution
    assert ShapesDataset(size=64, length=50, seed=3).scene(7) == a.scene(7)
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    with pytest.raises(IndexError):
        a[50]


def test_shapes_variety():
    d = ShapesDataset(size=32, length=300, seed=0)
    descs = [d.scene(i).description for i in range(300)]
    assert {len(x.objects) for x in descs} == {1, 2}
    assert {o.shape for x in descs for o in x.objects} == {"circle", "square", "triangle"}
    assert {o.colour for x in descs for o in x.objects} == set(COLOURS)
    assert {x.relation for x in descs if x.relation} == {"above", "below", "to the left of", "to the right of"}
    assert all(parse_caption(x.caption()) == x for x in descs)


def test_holdout():
    train = ShapesDataset(size=32, length=300, seed=0, holdout=["green triangle", {"size": "large", "colour": "red"}])
    held = train.heldout()
    combos = lambda ds: {(o.colour, o.shape, o.size) for i in range(len(ds)) for o in ds.scene(i).description.objects}
    tr = combos(train)
    assert not any(c == "green" and s == "triangle" for c, s, _ in tr)
    assert not any(c == "red" and z == "large" for c, _, z in tr)
    assert any(c == "green" and s != "triangle" for c, s, _ in tr)  # only the combination is removed
    for i in range(100):
        objs = held.scene(i).description.objects
        assert any((o.colour, o.shape) == ("green", "triangle") or (o.colour, o.size) == ("red", "large") for o in objs)
    with pytest.raises(ValueError, match="holdout"):
        parse_holdout("green banana")
    with pytest.raises(ValueError, match="holdout"):
        ShapesDataset(split="heldout")


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_right_on_ground_truth_wrong_on_mismatch(size):
    d = ShapesDataset(size=size, length=300, seed=11)
    rng = np.random.default_rng(0)
    right = wrong = 0
    for i in range(300):
        scene = d.scene(i)
        img = render(scene, size)
        right += score(img, scene.caption).match
        assert score(d[i]["image"], scene).match == score(img, scene).match  # tensor and PIL inputs agree
        wrong += not score(img, perturb(scene.description, rng)).match
    assert right >= 0.95 * 300
    assert wrong >= 0.95 * 300


def test_scorer_specific_mismatches():
    d = ShapesDataset(size=64, length=100, seed=1)
    scene = next(d.scene(i) for i in range(100) if d.scene(i).description.relation == "above")
    img = render(scene, 64)
    a, b = scene.description.objects
    assert score(img, scene.caption)
    assert not score(img, f"{a.phrase()} below {b.phrase()}")
    assert not score(img, f"{b.phrase()} above {a.phrase()}")
    other_shape = next(s for s in ("circle", "square", "triangle") if s != a.shape)
    assert not score(img, f"a {a.size} {a.colour} {other_shape} above {b.phrase()}")
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    result = score(blank, scene.caption)
    assert not result and "found 0" in result.reasons[0]
    with pytest.raises(ValueError, match="grammar"):
        score(img, "a photo of a dog")


def _write_folder(root, n=6):
    d = ShapesDataset(size=40, length=n, seed=0)
    for i in range(n):
        Image.fromarray((d[i]["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"{d[i]['caption']}\nsecond caption {i}\n")
    return d


def test_folder_dataset_skips_and_counts_bad_files(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "img1.png").write_bytes(b"this is not a png")       # corrupt
    (tmp_path / "img3.txt").unlink()                                 # missing caption
    (tmp_path / "img4.txt").write_text("\n  \n")                     # empty caption
    with pytest.warns(SkippedFileWarning):
        ds = ImageFolderDataset(tmp_path, size=16, seed=0)
    assert len(ds) == 4 and ds.skipped == {"missing_caption": 1, "empty_caption": 1}
    with pytest.warns(SkippedFileWarning, match="corrupt_image"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped["corrupt_image"] == 1
    assert items[1]["path"].endswith("img2.png")  # the corrupt img1 is replaced by the next image
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1]  # a known-bad file is not re-read or re-counted
    assert ds.skipped["corrupt_image"] == 1


def test_folder_dataset_caption_choice_seeded(tmp_path):
    _write_folder(tmp_path, n=4)
    a, b = ImageFolderDataset(tmp_path, size=16, seed=5), ImageFolderDataset(tmp_path, size=16, seed=5)
    picks = []
    for epoch in range(8):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert [a[i]["caption"] for i in range(4)] == [b[i]["caption"] for i in range(4)]
        picks += [a[i]["caption"] for i in range(4)]
    assert len(set(picks)) > 4  # both lines of a file get picked over the epochs
    assert ImageFolderDataset(tmp_path, size=24)[0]["image"].shape == (3, 24, 24)


def test_folder_dataset_rejects_bad_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image"):
        ImageFolderDataset(tmp_path)


def test_shards_roundtrip(tmp_path):
    d = ShapesDataset(size=16, length=10, seed=2)
    paths = write_shards((d[i] for i in range(10)), tmp_path, max_count=4)
    assert len(paths) == 3
    items = list(shard_dataset(paths, size=16))
    assert [it["caption"] for it in items] == [d[i]["caption"] for i in range(10)]
    for i, it in enumerate(items):
        assert torch.allclose(it["image"], d[i]["image"], atol=1 / 255)
    resized = next(iter(shard_dataset(paths[0], size=8)))
    assert resized["image"].shape == (3, 8, 8)


def test_folder_dataset_all_unreadable_is_value_error(tmp_path):
    _write_folder(tmp_path, n=2)
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tmp_path, size=16)
    with pytest.warns(SkippedFileWarning), pytest.raises(ValueError, match="every image under .* is unreadable"):
        ds[0]


_RAMP = np.linspace(0, 1, 64)


def _ramp_image(mode):
    """A 64x64 horizontal greyscale ramp 0 -> 1 in PIL ``mode``."""
    if mode == "F":
        return Image.fromarray(np.tile(_RAMP, (64, 1)).astype(np.float32))
    ramp16 = np.tile(np.round(_RAMP * 65535).astype(np.uint16), (64, 1))
    if mode == "I;16B":
        return Image.frombytes("I;16B", (64, 64), ramp16.astype(">u2").tobytes())
    img = Image.fromarray(ramp16)  # I;16
    return img if mode == "I;16" else img.convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_depth_images_scaled_to_unit_range(mode):
    img = _ramp_image(mode)
    assert img.mode == mode
    expected = torch.from_numpy(_RAMP).float().expand(3, 64, 64)
    assert torch.allclose(pil_to_tensor(img), expected, atol=0.5 / 255 + 1e-6)
    # the scorer's input conversion too (it takes user images)
    assert np.allclose(shapes._to_array(img), expected.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)


def test_high_bit_depth_out_of_range_rejected():
    with pytest.raises(ValueError, match="mode 'F'"):
        pil_to_tensor(Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)))
    with pytest.raises(ValueError, match="mode 'I'"):
        pil_to_tensor(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))


def test_16bit_png_in_folder_and_shards(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _ramp_image("I;16").save(folder / "ramp.png")  # 16-bit greyscale PNG
    (folder / "ramp.txt").write_text("a grey ramp\n")
    expected = torch.from_numpy(_RAMP).float().expand(3, 64, 64)
    image = ImageFolderDataset(folder, size=64)[0]["image"]
    assert torch.allclose(image, expected, atol=0.5 / 255 + 1e-6)
    # written from a 16-bit PIL image
    paths = write_shards([{"image": Image.open(folder / "ramp.png"), "caption": "a grey ramp"}], tmp_path / "a")
    assert torch.allclose(next(iter(shard_dataset(paths, size=64)))["image"], expected, atol=0.5 / 255 + 1e-6)
    # a shard made elsewhere that holds the 16-bit PNG itself
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "0", "png": (folder / "ramp.png").read_bytes(), "txt": "a grey ramp"})
    assert torch.allclose(next(iter(shard_dataset(str(tmp_path / "b.tar"), size=64)))["image"], expected,
                          atol=0.5 / 255 + 1e-6)


def test_write_shards_returns_only_this_write_and_refuses_old_shards(tmp_path):
    d = ShapesDataset(size=16, length=7, seed=0)
    assert len(write_shards((d[i] for i in range(7)), tmp_path, max_count=3)) == 3
    with pytest.raises(ValueError, match="overwrite"):
        write_shards((d[i] for i in range(2)), tmp_path, max_count=3)
    assert len(list(tmp_path.glob("shard-*.tar"))) == 3  # refused: nothing touched
    paths = write_shards((d[i] for i in range(2)), tmp_path, max_count=3, overwrite=True)
    assert paths == [str(tmp_path / "shard-000000.tar")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # the old shards are gone
    assert [it["caption"] for it in shard_dataset(paths, size=16)] == [d[0]["caption"], d[1]["caption"]]
    # another prefix in the same directory is independent
    other = write_shards((d[i] for i in range(1)), tmp_path, prefix="other")
    assert other == [str(tmp_path / "other-000000.tar")] and (tmp_path / "shard-000000.tar").is_file()
    assert write_shards([], tmp_path / "empty") == [] and list((tmp_path / "empty").iterdir()) == []


def test_write_shards_failure_leaves_no_partial_shards(tmp_path):
    d = ShapesDataset(size=16, length=5, seed=0)
    samples = [d[i] for i in range(4)] + [{"image": d[4]["image"], "caption": 5}]
    with pytest.raises(ValueError, match=r"samples\[4\]"):
        write_shards(samples, tmp_path, max_count=3)
    assert list(tmp_path.glob("shard-*.tar")) == []
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        write_shards(samples[4:], tmp_path)
    with pytest.raises(ValueError, match=r"samples\[1\] needs an 'image'"):
        write_shards([samples[0], {"caption": "no image"}], tmp_path)
    assert list(tmp_path.glob("shard-*.tar")) == []
    assert len(write_shards(samples[:4], tmp_path, max_count=3)) == 2  # a retry needs no overwrite
