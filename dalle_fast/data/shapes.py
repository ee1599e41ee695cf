"""Built-in synthetic captioned-shapes dataset and its rule-based scorer.

Scenes hold one shape ("a large red circle in the top left") or two shapes in a spatial relation
("a small red circle above a large blue square"). Everything is procedural and seeded: item ``i``
of a dataset with seed ``s`` is always the same scene, at any resolution.

Attribute combinations can be held out of training (``holdout=["green triangle"]``); the same
dataset with ``split="heldout"`` yields only scenes that contain a held-out combination, for
zero-shot evaluation. :func:`score` checks by pixel analysis (colour segmentation, connected
components, bounding-box fill ratio) whether an image shows what a caption says.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
BACKGROUND = (255, 255, 255)
SIZES: dict[str, float] = {"small": 0.24, "large": 0.40}  # bounding-box side as a fraction of the image
SIZE_THRESHOLD = 0.32
RELATIONS = ("above", "below", "to the left of", "to the right of")
POSITIONS = ("in the top left", "at the top", "in the top right",
             "on the left", "in the center", "on the right",
             "in the bottom left", "at the bottom", "in the bottom right")  # row-major 3x3 grid
_GAP = 0.06          # minimum gap between the two shapes along the relation axis
_JITTER = 0.10       # maximum offset between the two shapes across the relation axis
_CELL_MARGIN = 0.03  # keep single-shape centres this far inside their grid cell
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one shape."""
    shape: str
    colour: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Description:
    """Structured caption: one object with a ``position`` or two objects with a ``relation``
    (``objects[0] <relation> objects[1]``)."""
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    position: str | None = None

    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"{self.objects[0].phrase()} {self.position}"
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"


@dataclass(frozen=True)
class Scene:
    """A description plus where each object's bounding-box centre is, in [0, 1] image units."""
    description: Description
    centres: tuple[tuple[float, float], ...]

    @property
    def caption(self) -> str:
        return self.description.caption()


_OBJ = r"an? (small|large) (\w+) (\w+)"
_SINGLE_RE = re.compile(rf"{_OBJ} ({'|'.join(POSITIONS)})")
_PAIR_RE = re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")


def _object(size: str, colour: str, shape: str, caption: str) -> ObjectSpec:
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"caption {caption!r} names an unknown colour or shape ({colour!r}, {shape!r})")
    return ObjectSpec(shape, colour, size)


def parse_caption(caption: str) -> Description:
    """Inverse of :meth:`Description.caption` (case and surrounding space insensitive)."""
    text = " ".join(caption.lower().split())
    if m := _SINGLE_RE.fullmatch(text):
        return Description((_object(m[1], m[2], m[3], caption),), position=m[4])
    if m := _PAIR_RE.fullmatch(text):
        return Description((_object(m[1], m[2], m[3], caption), _object(m[5], m[6], m[7], caption)), relation=m[4])
    raise ValueError(f"caption {caption!r} is not in the shapes grammar")


def parse_holdout(item: str | Mapping[str, str]) -> dict[str, str]:
    """``"green triangle"`` or ``{"colour": "green", "shape": "triangle"}`` -> attribute dict."""
    if isinstance(item, Mapping):
        combo = dict(item)
        for key, value in combo.items():
            if key not in ATTRIBUTES or value not in ATTRIBUTES[key]:
                raise ValueError(f"holdout entry {item!r}: {key}={value!r} is not a known attribute value")
        return combo
    combo = {}
    for word in str(item).lower().split():
        key = next((k for k, vals in ATTRIBUTES.items() if word in vals), None)
        if key is None or key in combo:
            raise ValueError(f"holdout entry {item!r}: word {word!r} is not a (single) colour, shape or size")
        combo[key] = word
    if not combo:
        raise ValueError(f"holdout entry {item!r} is empty")
    return combo


def _matches(obj: ObjectSpec, combo: Mapping[str, str]) -> bool:
    return all(getattr(obj, k) == v for k, v in combo.items())


def sample_scene(rng: np.random.Generator, max_shapes: int = 2) -> Scene:
    """Draw a random scene (attributes and layout) from ``rng``."""
    n = 1 if max_shapes == 1 else int(rng.integers(1, 3))
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objects = tuple(ObjectSpec(SHAPES[rng.integers(len(SHAPES))], tuple(COLOURS)[c],
                               tuple(SIZES)[rng.integers(len(SIZES))]) for c in colours)
    half = [SIZES[o.size] / 2 for o in objects]
    if n == 1:
        cell = int(rng.integers(len(POSITIONS)))
        centre = []
        for idx in (cell % 3, cell // 3):  # x from the column, y from the row
            lo = max(idx / 3 + _CELL_MARGIN, half[0])
            hi = min((idx + 1) / 3 - _CELL_MARGIN, 1 - half[0])
            centre.append(float(rng.uniform(lo, hi)))
        return Scene(Description(objects, position=POSITIONS[cell]), (tuple(centre),))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    ha, hb = half
    # along the relation axis: "first" lies before "second" with a gap
    first = float(rng.uniform(ha, 1 - hb - (ha + hb + _GAP)))
    second = float(rng.uniform(first + ha + hb + _GAP, 1 - hb))
    if relation in ("below", "to the right of"):  # mirror: A after B
        first, second = 1 - first, 1 - second
    h = max(ha, hb)
    across_a = float(rng.uniform(h, 1 - h))
    across_b = float(np.clip(across_a + rng.uniform(-_JITTER, _JITTER), hb, 1 - hb))
    if relation in ("above", "below"):
        centres = ((across_a, first), (across_b, second))
    else:
        centres = ((first, across_a), (second, across_b))
    return Scene(Description(objects, relation=relation), centres)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (crisp edges, white background)."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy) in zip(scene.description.objects, scene.centres):
        h = SIZES[obj.size] / 2
        x0, x1 = round((cx - h) * size), round((cx + h) * size) - 1
        y0, y1 = round((cy - h) * size), round((cy + h) * size) - 1
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """PIL image of any mode -> 8-bit RGB. Integer greyscale (``I;16*``, ``I``: how 16-bit PNGs open)
    is read as [0, 65535] and float greyscale (``F``) as [0, 1]; ``convert("RGB")`` alone would clip
    them at 255. Values outside that range raise ValueError."""
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        full = 1.0 if img.mode == "F" else 65535.0
        if arr.size and not (np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= full):
            raise ValueError(f"image of mode {img.mode!r} must hold values in [0, {full:g}], "
                             f"got range [{arr.min():g}, {arr.max():g}]")
        img = Image.fromarray(np.round(arr * (255.0 / full)).astype(np.uint8))
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, see :func:`to_rgb`) -> float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """Seeded captioned-shapes dataset. Item ``i`` -> ``{"image": (3, size, size) float in [0, 1],
    "caption": str}``; :meth:`scene` gives the structured attributes.

    ``holdout`` lists attribute combinations (``"green triangle"``, ``"large red"``, or dicts with
    keys ``shape``/``colour``/``size``). ``split="train"`` never contains a held-out combination;
    ``split="heldout"`` contains one in every scene.
    """

    def __init__(self, size: int = 32, length: int = 10_000, seed: int = 0,
                 holdout: Iterable[str | Mapping[str, str]] = (), split: str = "train", max_shapes: int = 2) -> None:
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if max_shapes not in (1, 2):
            raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes!r}")
        self.size, self.length, self.seed, self.split, self.max_shapes = size, length, int(seed), split, max_shapes
        self.holdout = tuple(parse_holdout(h) for h in holdout)
        if split == "heldout" and not self.holdout:
            raise ValueError("split='heldout' needs a non-empty holdout")

    def __len__(self) -> int:
        return self.length

    def is_held_out(self, description: Description) -> bool:
        """Whether any object of ``description`` matches a held-out combination."""
        return any(_matches(o, c) for o in description.objects for c in self.holdout)

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (a pure function of seed, index, holdout and split)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        want_held_out = self.split == "heldout"
        for _ in range(10_000):
            scene = sample_scene(rng, self.max_shapes)
            if self.is_held_out(scene.description) == want_held_out:
                return scene
        raise ValueError(f"holdout {self.holdout} leaves (almost) no scenes for split {self.split!r}")

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": pil_to_tensor(render(scene, self.size)), "caption": scene.caption}

    def heldout(self) -> "ShapesDataset":
        """The same dataset restricted to scenes with a held-out combination."""
        return ShapesDataset(self.size, self.length, self.seed, self.holdout, "heldout", self.max_shapes)

    def captions(self) -> list[str]:
        """All captions, in index order (e.g. to train a tokenizer)."""
        return [self.scene(i).caption for i in range(self.length)]


# ---------------------------------------------------------------------------------------------
# scorer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectedObject:
    colour: str
    area: int
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive ends)
    image_size: int

    @property
    def fill(self) -> float:
        y0, x0, y1, x1 = self.bbox
        return self.area / ((y1 - y0) * (x1 - x0))

    @property
    def shape(self) -> str:
        fill = self.fill
        return "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"

    @property
    def size(self) -> str:
        y0, x0, y1, x1 = self.bbox
        return "large" if max(y1 - y0, x1 - x0) / self.image_size > SIZE_THRESHOLD else "small"

    @property
    def centre(self) -> tuple[float, float]:
        """Bounding-box centre (x, y) in [0, 1] units."""
        y0, x0, y1, x1 = self.bbox
        return (x0 + x1) / 2 / self.image_size, (y0 + y1) / 2 / self.image_size


@dataclass(frozen=True)
class ScoreResult:
    """``match`` and, when it is False, why."""
    match: bool
    reasons: tuple[str, ...]
    objects: tuple[DetectedObject, ...]

    def __bool__(self) -> bool:
        return self.match


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    raise ValueError(f"image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


def detect_objects(image, min_area_fraction: float = 0.004, max_colour_distance: float = 0.3) -> list[DetectedObject]:
    """Segment ``image`` by nearest palette colour and return its coloured connected components
    larger than ``min_area_fraction`` of the image. ``image``: PIL image or (3, H, W) tensor in [0, 1]."""
    arr = _to_array(image)
    h, w, _ = arr.shape
    if h != w:
        raise ValueError(f"image must be square, got {h}x{w}")
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32) / 255.0
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, P)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > max_colour_distance] = 0
    min_area = max(4, int(min_area_fraction * h * w))
    found = []
    for index, name in enumerate(COLOURS, start=1):
        components, count = ndimage.label(labels == index)
        for comp_slice, comp_id in zip(ndimage.find_objects(components), range(1, count + 1)):
            area = int((components[comp_slice] == comp_id).sum())
            if area >= min_area:
                ys, xs = comp_slice
                found.append(DetectedObject(name, area, (ys.start, xs.start, ys.stop, xs.stop), h))
    return found


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    return abs(dx) > abs(dy) and (dx > 0) == (relation == "to the left of")


def _position_of(obj: DetectedObject) -> str:
    x, y = obj.centre
    col, row = min(int(x * 3), 2), min(int(y * 3), 2)
    return POSITIONS[row * 3 + col]


def score(image, caption: str | Description | Scene) -> ScoreResult:
    """Does ``image`` show ``caption``? Checks the number of objects, each object's colour, shape
    (fill ratio of its bounding box) and size, and the relation or grid position.

    ``image``: PIL image or (3, H, W) float tensor in [0, 1]. ``caption``: a shapes-grammar caption,
    a :class:`Description` or a :class:`Scene`.
    """
    if isinstance(caption, Scene):
        desc = caption.description
    elif isinstance(caption, Description):
        desc = caption
    elif isinstance(caption, str):
        desc = parse_caption(caption)
    else:
        raise ValueError(f"caption must be a str, Description or Scene, got {type(caption).__name__}")
    objects = detect_objects(image)
    reasons = []
    if len(objects) != len(desc.objects):
        reasons.append(f"expected {len(desc.objects)} objects, found {len(objects)}")
    matched = []
    for spec in desc.objects:
        same_colour = [o for o in objects if o.colour == spec.colour]
        if len(same_colour) != 1:
            reasons.append(f"expected one {spec.colour} object, found {len(same_colour)}")
            continue
        obj = same_colour[0]
        matched.append(obj)
        if obj.shape != spec.shape:
            reasons.append(f"{spec.colour} object looks like a {obj.shape} (fill {obj.fill:.2f}), not a {spec.shape}")
        if obj.size != spec.size:
            reasons.append(f"{spec.colour} {spec.shape} is {obj.size}, not {spec.size}")
    if len(matched) == len(desc.objects):
        if desc.relation is not None and not _relation_holds(matched[0], matched[1], desc.relation):
            reasons.append(f"the {desc.objects[0].colour} object is not {desc.relation} the {desc.objects[1].colour} one")
        if desc.position is not None and _position_of(matched[0]) != desc.position:
            reasons.append(f"object is {_position_of(matched[0])}, not {desc.position}")
    return ScoreResult(not reasons, tuple(reasons), tuple(objects))


def perturb(description: Description, rng: np.random.Generator) -> Description:
    """A description that differs from ``description`` in exactly one attribute (colour, shape,
    size, relation or position) and so must not match an image of it. For negative tests."""
    objects = list(description.objects)
    choices = ["colour", "shape", "size", "layout"]
    kind = choices[rng.integers(len(choices))]
    i = int(rng.integers(len(objects)))
    if kind == "layout":
        if description.relation is not None:
            options = [r for r in RELATIONS if r != description.relation]
            return dataclasses.replace(description, relation=options[rng.integers(len(options))])
        options = [p for p in POSITIONS if p != description.position]
        return dataclasses.replace(description, position=options[rng.integers(len(options))])
    used = {o.colour for o in objects}
    values = [v for v in ATTRIBUTES[kind] if v != getattr(objects[i], kind) and (kind != "colour" or v not in used)]
    objects[i] = dataclasses.replace(objects[i], **{kind: values[rng.integers(len(values))]})
    return dataclasses.replace(description, objects=tuple(objects))


__all__ = ["SHAPES", "COLOURS", "SIZES", "RELATIONS", "POSITIONS", "ObjectSpec", "Description", "Scene",
           "ShapesDataset", "DetectedObject", "ScoreResult", "parse_caption", "parse_holdout", "sample_scene",
           "render", "to_rgb", "pil_to_tensor", "detect_objects", "score", "perturb"]
