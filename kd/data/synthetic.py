"""A generated COCO-format detection dataset: textured shapes on cluttered, textured backgrounds.

Ten categories are the cells of a ring over five shapes and five appearances (colour + texture):
category ``2i`` is (shape ``i``, appearance ``i``) and ``2i+1`` is (shape ``i``, appearance ``i+1 mod 5``).
Every shape therefore occurs with two appearances and every appearance with two shapes, so neither the
shape nor the appearance alone names the class. The appearances share colours on purpose: red solid vs
red striped differ only by texture, red striped vs blue striped only by colour.

Annotation conventions (recorded in each JSON ``info``):
- ``bbox`` is the tight box of the *visible* pixels of the object (after occlusion by later objects and
  truncation by the image border), in pixels ``[x, y, w, h]``; objects with less than
  ``1 - max_occlusion`` of their pixels visible are dropped (still drawn, not annotated).
- ``area`` is the area of that box (``w * h``), which sets the COCO size bucket (small < 32^2 <= medium
  < 96^2 <= large); ``segmentation`` is ``[]``; ``iscrowd`` is 0.
- Clutter (lines, zigzags, dots, elongated ellipses, shape outlines, pentagons and hexagons, in any colour,
  category colours included) is drawn under the objects and is never annotated; a few thin lines are
  drawn over the objects and do not count as occlusion.

Output is a pure function of the config: each image has its own seed (``SeedSequence([seed, split,
index])``), so the bytes do not depend on the number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "kd-synthetic-2"
SPLITS = ("train", "val")
SHAPES = ("circle", "square", "triangle", "star", "cross")
# name, foreground RGB, background RGB (second colour of the texture), texture
APPEARANCES = (
    ("red_solid", (215, 45, 40), (215, 45, 40), "solid"),
    ("red_striped", (215, 45, 40), (240, 225, 215), "stripes"),
    ("blue_striped", (40, 80, 215), (240, 225, 215), "stripes"),
    ("blue_checked", (40, 80, 215), (25, 25, 60), "checker"),
    ("yellow_dotted", (235, 200, 40), (40, 30, 20), "dots"),
)
_SPLIT_CODE = {"train": 0, "val": 1}
_BUCKETS = ("small", "medium", "large")


def _build_categories() -> list[dict]:
    """The 10 COCO category records; ids are 1, 4, 7, ... (not contiguous) so label maps matter."""
    cats = []
    for k in range(2 * len(SHAPES)):
        shape, appearance = k // 2, (k // 2 + k % 2) % len(APPEARANCES)
        name = f"{APPEARANCES[appearance][0]}_{SHAPES[shape]}"
        cats.append({"id": 1 + 3 * k, "name": name, "supercategory": SHAPES[shape]})
    return cats


CATEGORIES = _build_categories()
# category index -> (shape index, appearance index)
CATEGORY_PARTS = tuple((k // 2, (k // 2 + k % 2) % len(APPEARANCES)) for k in range(len(CATEGORIES)))


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings; the first seven fields mirror ``params.yaml`` ``data.synthetic``.

    Args:
        seed: base seed; image ``i`` of a split uses ``SeedSequence([seed, split, i])``.
        num_train, num_val: number of images per split.
        min_side, max_side: each image side is drawn independently in this range (varied aspect ratios).
        min_objects, max_objects: objects placed per image (fewer may survive the occlusion filter).
        object_count_power: the object count is ``min + floor((max - min + 1) * U ** power)``, U uniform:
            1 gives a uniform count, larger values favour few objects.
        large_per_image: probabilities of 0, 1, 2, ... large objects in an image.
        small_share: probability that a non-large object is small (else medium).
        min_object_size: nominal size (pixels) of the smallest small object (small: this..30 px).
        max_occlusion: objects with a larger hidden fraction of their pixels are not annotated.
        max_clutter: at most this many clutter items per image.
    """

    seed: int = 0
    num_train: int = 2000
    num_val: int = 250
    min_side: int = 128
    max_side: int = 192
    min_objects: int = 1
    max_objects: int = 20
    object_count_power: float = 3.0
    large_per_image: tuple[float, ...] = (0.05, 0.6, 0.35)
    small_share: float = 0.3
    min_object_size: float = 12.0
    max_occlusion: float = 0.5
    max_clutter: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "large_per_image", tuple(float(p) for p in self.large_per_image))
        checks = [
            ("num_train", self.num_train >= 1, "must be >= 1"),
            ("num_val", self.num_val >= 1, "must be >= 1"),
            ("min_side", 48 <= self.min_side <= self.max_side, "must satisfy 48 <= min_side <= max_side"),
            ("min_objects", 1 <= self.min_objects <= self.max_objects, "must satisfy 1 <= min <= max"),
            ("large_per_image", min(self.large_per_image, default=-1) >= 0, "must be probabilities"),
            ("small_share", 0.0 <= self.small_share <= 1.0, "must be in [0, 1]"),
            ("min_object_size", 4.0 <= self.min_object_size <= 30.0, "must be in [4, 30]"),
            ("max_occlusion", 0.0 <= self.max_occlusion < 1.0, "must be in [0, 1)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SyntheticConfig.{name}: {why} (got {getattr(self, name)!r})")

    @classmethod
    def from_dict(cls, values: dict) -> SyntheticConfig:
        """Build from a plain dict (e.g. ``params['data']['synthetic']``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"data.synthetic: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def config_hash(self) -> str:
        """Short hash of the generator version and every field; stored in the JSON ``info``."""
        blob = json.dumps({"generator": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------


def _unit_polygon(shape: str) -> np.ndarray:
    """Shape outline in the unit box [-0.5, 0.5]^2. Returns [K, 2] (x, y)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        a = 0.18
        xy = [(-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a), (a, 0.5), (-a, 0.5)]
        return np.array(xy + [(-a, a), (-0.5, a), (-0.5, -a), (-a, -a)])
    if shape == "pentagon" or shape == "hexagon":
        n = 5 if shape == "pentagon" else 6
        t = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    raise ValueError(f"unknown shape {shape!r}")


def _place_polygon(unit: np.ndarray, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Scale a unit polygon [K, 2] to (w, h), rotate by ``angle`` (radians), move to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    p = unit * np.array([w, h])
    return np.stack([c * p[:, 0] - s * p[:, 1] + cx, s * p[:, 0] + c * p[:, 1] + cy], 1)


def _rasterise(poly: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of a polygon [K, 2] (4x supersampling).

    Returns (alpha [h, w] float32 in [0, 1], x0, y0): the patch and its top-left pixel in the image.
    """
    x0, y0 = np.floor(poly.min(0)).astype(int) - 1
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
    ss = 4 if max(x1 - x0, y1 - y0) < 64 else 2
    size = (int(x1 - x0), int(y1 - y0))
    hi = Image.new("L", (size[0] * ss, size[1] * ss), 0)
    ImageDraw.Draw(hi).polygon([tuple(v) for v in ((poly - [x0, y0]) * ss)], fill=255)
    alpha = np.asarray(hi.resize(size, Image.BOX), dtype=np.float32) / 255.0
    return alpha, int(x0), int(y0)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float, phase: np.ndarray) -> np.ndarray:
    """Pattern [h, w] float32 in {0, 1} in object coordinates (u, v) in pixels; 1 -> foreground colour."""
    if kind == "solid":
        return np.ones_like(u)
    a = u * np.float32(1 / period) + np.float32(phase[0])
    if kind == "stripes":  # half a period foreground, half background
        return 1 - (np.floor(2 * a).astype(np.int32) & 1).astype(np.float32)
    b = v * np.float32(1 / period) + np.float32(phase[1])
    if kind == "checker":
        return 1 - ((np.floor(a).astype(np.int32) + np.floor(b).astype(np.int32)) & 1).astype(np.float32)
    if kind == "dots":  # background-coloured dots on the foreground
        a -= np.floor(a) + np.float32(0.5)
        b -= np.floor(b) + np.float32(0.5)
        return (a * a + b * b > np.float32(0.32**2)).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted gradient + optional stripes + optional low-frequency noise. Returns [h, w, 3] float32."""
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    base = rng.uniform(50, 200, size=(2, 1)) + rng.uniform(-30, 30, size=(2, 3))
    t = rng.uniform(0, 2 * np.pi)
    g = np.float32(np.cos(t)) * xx + np.float32(np.sin(t)) * yy
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    base = base.astype(np.float32)
    img = base[0] + (base[1] - base[0]) * g[..., None]
    if rng.random() < 0.5:
        t, period = rng.uniform(0, np.pi), rng.uniform(5, 40)
        k = np.float32(2 * np.pi / period)
        wave = np.sin(k * np.float32(np.cos(t)) * xx + k * np.float32(np.sin(t)) * yy)
        img += np.float32(rng.uniform(6, 25)) * wave[..., None]
    if rng.random() < 0.5:
        gh, gw = rng.integers(3, 10, size=2)
        grid = rng.normal(0, 1, size=(gh, gw, 3)).astype(np.float32)
        small = Image.fromarray(((grid.clip(-3, 3) + 3) * 42.5).astype(np.uint8))
        up = (np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32) / 42.5) - 3
        img += np.float32(rng.uniform(8, 25)) * up
    return img


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Any colour; half the time one of the category colours (so colour alone is not a cue)."""
    if rng.random() < 0.5:
        c = np.array(APPEARANCES[rng.integers(len(APPEARANCES))][1]) + rng.normal(0, 12, 3)
    else:
        c = rng.uniform(0, 255, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, kind: str) -> None:
    """One non-object item: line, zigzag, dot, elongated ellipse, shape outline or a non-category polygon."""
    colour = _random_colour(rng)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if kind in ("line", "zigzag"):
        n = 2 if kind == "line" else int(rng.integers(3, 6))
        pts = np.stack([rng.uniform(-0.1, 1.1, n) * w, rng.uniform(-0.1, 1.1, n) * h], 1)
        draw.line([tuple(p) for p in pts], fill=colour, width=int(rng.integers(1, 4)))
    elif kind == "dot":
        r = rng.uniform(1, 3.5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ellipse":
        length = rng.uniform(12, 60)
        poly = _place_polygon(
            _unit_polygon("circle"), cx, cy, length, length / rng.uniform(3, 6), rng.uniform(0, np.pi)
        )
        draw.polygon([tuple(p) for p in poly], fill=colour)
    elif kind == "outline":
        shape = SHAPES[rng.integers(len(SHAPES))]
        s = rng.uniform(12, 60)
        poly = _place_polygon(_unit_polygon(shape), cx, cy, s, s, rng.uniform(0, np.pi))
        draw.line([tuple(p) for p in np.vstack([poly, poly[:1]])], fill=colour, width=int(rng.integers(1, 3)))
    else:  # pentagon / hexagon, filled, in any colour
        s = rng.uniform(16, 50)
        poly = _place_polygon(_unit_polygon(kind), cx, cy, s, s, rng.uniform(0, np.pi))
        draw.polygon([tuple(p) for p in poly], fill=colour)


_CLUTTER_KINDS = ("line", "zigzag", "dot", "dot", "ellipse", "outline", "pentagon", "hexagon")


def _object_sizes(cfg: SyntheticConfig, rng: np.random.Generator, n: int, short: int) -> np.ndarray:
    """Nominal sizes [n] (pixels): small ``min_object_size``..30, medium 32..92, large 104..0.95 * short side.

    The number of large objects is drawn from ``cfg.large_per_image`` (P(0), P(1), P(2), ...); the rest
    are small with probability ``cfg.small_share``, else medium.
    """
    p_large = np.array(cfg.large_per_image) / sum(cfg.large_per_image)
    n_large = min(int(rng.choice(len(p_large), p=p_large)), n)
    buckets = np.where(rng.random(n) < cfg.small_share, 0, 1)
    buckets[:n_large] = 2
    lo = np.array([cfg.min_object_size, 32.0, 104.0])
    hi = np.array([30.0, 92.0, max(105.0, 0.95 * short)])
    u = rng.random(n)
    return np.exp(np.log(lo[buckets]) + u * (np.log(hi[buckets]) - np.log(lo[buckets])))


def _place_centres(rng: np.random.Generator, sizes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Centres [n, 2]: for each object the least-overlapping of 4 random candidates (largest first)."""
    boxes: list[np.ndarray] = []
    centres = np.zeros((len(sizes), 2))
    for i, s in enumerate(sizes):
        half = np.minimum(s / 2, np.array([w, h]) / 2)
        inside = 0.6 if s < 96 else 1.0  # small/medium: at most ~20% outside; large: fully inside
        lo, hi = half * inside, np.array([w, h]) - half * inside
        cand = lo + rng.random((4, 2)) * (hi - lo)
        if boxes:
            placed = np.stack(boxes)
            ix = np.clip(
                np.minimum(cand[:, None, 0] + s / 2, placed[None, :, 2])
                - np.maximum(cand[:, None, 0] - s / 2, placed[None, :, 0]),
                0,
                None,
            )
            iy = np.clip(
                np.minimum(cand[:, None, 1] + s / 2, placed[None, :, 3])
                - np.maximum(cand[:, None, 1] - s / 2, placed[None, :, 1]),
                0,
                None,
            )
            cand = cand[np.argmin((ix * iy).sum(1))][None]
        centres[i] = cand[0]
        boxes.append(np.array([*(cand[0] - s / 2), *(cand[0] + s / 2)]))
    return centres


def _draw_object(
    canvas: np.ndarray, rng: np.random.Generator, category: int, cx: float, cy: float, size: float
) -> tuple[np.ndarray, int, int]:
    """Composite one textured object onto ``canvas`` [H, W, 3] float32 in place.

    Returns (alpha [h, w] of the full object, x0, y0) so the caller can track occlusion.
    """
    shape, appearance = CATEGORY_PARTS[category]
    _, fg, bg, kind = APPEARANCES[appearance]
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    angle = rng.uniform(0, 2 * np.pi) if SHAPES[shape] != "square" else rng.uniform(-0.5, 0.5)
    poly = _place_polygon(_unit_polygon(SHAPES[shape]), cx, cy, size * aspect**0.5, size / aspect**0.5, angle)
    alpha, x0, y0 = _rasterise(poly)
    H, W = canvas.shape[:2]
    ph, pw = alpha.shape
    ys, xs = slice(max(y0, 0), min(y0 + ph, H)), slice(max(x0, 0), min(x0 + pw, W))
    # pixel-centre offsets from the object centre, visible part of the patch only: dy [h, 1], dx [1, w]
    dy = (np.arange(ys.start, ys.stop, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
    dx = (np.arange(xs.start, xs.stop, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = c * dx + s * dy, c * dy - s * dx
    period = float(np.clip(size / 5, 2.5, 14)) * rng.uniform(0.85, 1.15)
    pattern = _texture(kind, u, v, period, rng.random(2))
    fg_bg = (np.array([fg, bg]) + rng.normal(0, 10, size=(2, 3))).astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    k = np.float32(rng.uniform(0, 0.25) / max(size, 1.0))
    shade = 1 + (k * np.float32(np.cos(t))) * dx + (k * np.float32(np.sin(t))) * dy
    colour = (fg_bg[1] + pattern[..., None] * (fg_bg[0] - fg_bg[1])) * shade[..., None]
    a = alpha[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0][..., None]
    region = canvas[ys, xs]
    region += a * (colour - region)
    return alpha, x0, y0


def render_image(cfg: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """Render image ``index`` of ``split`` (deterministic from ``cfg.seed``).

    Returns:
        image: [H, W, 3] uint8 RGB.
        objects: list of ``{"category": k (index into CATEGORIES), "bbox": [x, y, w, h], "area": w*h}``
            for the annotated (visible enough) objects, in drawing order.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLIT_CODE[split], index]))
    w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
    canvas = _background(rng, h, w)
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, cfg.max_clutter + 1))):
        _draw_clutter(draw, rng, w, h, _CLUTTER_KINDS[rng.integers(len(_CLUTTER_KINDS))])
    canvas = np.asarray(pil, dtype=np.float32).copy()

    span = cfg.max_objects - cfg.min_objects + 1
    n = cfg.min_objects + int(span * rng.random() ** cfg.object_count_power)
    sizes = _object_sizes(cfg, rng, n, min(w, h))
    sizes = sizes[np.argsort(-sizes * np.exp(rng.normal(0, 0.3, n)))]  # mostly large first
    centres = _place_centres(rng, sizes, w, h)
    categories = rng.integers(len(CATEGORIES), size=n)
    owner = np.full((h, w), -1, dtype=np.int32)
    drawn = []
    for i in range(n):
        alpha, x0, y0 = _draw_object(canvas, rng, int(categories[i]), *centres[i], sizes[i])
        full = alpha > 0.5
        ys, xs = slice(max(y0, 0), min(y0 + full.shape[0], h)), slice(max(x0, 0), min(x0 + full.shape[1], w))
        owner[ys, xs][full[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]] = i
        drawn.append((int(full.sum()), ys, xs))

    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 3))):  # thin lines over everything (not occluders)
        _draw_clutter(draw, rng, w, h, "line")
    noise = np.float32(rng.uniform(2, 7)) * rng.standard_normal(size=(h, w, 3), dtype=np.float32)
    image = np.clip(np.asarray(pil, dtype=np.float32) + noise, 0, 255).astype(np.uint8)

    objects = []
    for i, (full_count, ys, xs) in enumerate(drawn):
        visible = owner[ys, xs] == i
        count = int(visible.sum())
        if count < 6 or count < (1 - cfg.max_occlusion) * full_count:
            continue
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        bx, by = xs.start + cols[0], ys.start + rows[0]
        bw, bh = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        bbox = [float(bx), float(by), float(bw), float(bh)]
        objects.append({"category": int(categories[i]), "bbox": bbox, "area": float(bw * bh)})
    return image, objects


# ----------------------------------------------------------------------------------------------------
# dataset files
# ----------------------------------------------------------------------------------------------------


def size_bucket(area: float) -> str:
    """COCO size bucket of an annotation area: small (< 32^2), medium (< 96^2) or large."""
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def bucket_fractions(annotations: list[dict]) -> dict[str, float]:
    """Fraction of annotations in each COCO size bucket (by their ``area``)."""
    counts = dict.fromkeys(_BUCKETS, 0)
    for ann in annotations:
        counts[size_bucket(ann["area"])] += 1
    total = max(len(annotations), 1)
    return {k: v / total for k, v in counts.items()}


def _render_job(job: tuple[SyntheticConfig, str, int, str]) -> dict:
    """Worker: render one image, write its PNG, return its record and objects."""
    cfg, split, index, out_dir = job
    image, objects = render_image(cfg, split, index)
    file_name = f"{index:06d}.png"
    Image.fromarray(image).save(Path(out_dir) / file_name, format="PNG", compress_level=1)
    h, w = image.shape[:2]
    return {"file_name": file_name, "width": w, "height": h, "objects": objects}


def _coco_json(cfg: SyntheticConfig, split: str, records: list[dict]) -> dict:
    """Assemble the COCO instances dict of one split from the rendered records."""
    images, annotations = [], []
    for i, rec in enumerate(records):
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": rec["file_name"],
                "width": rec["width"],
                "height": rec["height"],
                "license": 1,
            }
        )
        for obj in rec["objects"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES[obj["category"]]["id"],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )
    info = {
        "description": "kd synthetic shapes: textured shapes on cluttered backgrounds",
        "version": GENERATOR_VERSION,
        "year": 2025,
        "contributor": "kd.data.synthetic",
        "url": "",
        "date_created": "",
        "split": split,
        "bbox": "tight box of the visible pixels",
        "area": "bbox area w*h",
        "config": asdict(cfg),
        "config_hash": cfg.config_hash(),
    }
    licenses = [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    return {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def _existing_hash(root: Path) -> str | None:
    """Config hash of a complete dataset already at ``root`` (None if absent/incomplete)."""
    hashes = set()
    for split in SPLITS:
        ann = root / "annotations" / f"instances_{split}.json"
        try:
            data = json.loads(ann.read_text())
            n_files = len(list((root / split).glob("*.png")))
        except (OSError, ValueError):
            return None
        if n_files != len(data.get("images", [])):
            return None
        hashes.add(data.get("info", {}).get("config_hash"))
    return hashes.pop() if len(hashes) == 1 else None


def _is_replaceable(root: Path) -> bool:
    """True if ``root`` is absent, empty, or a dataset this generator wrote (safe to replace)."""
    if not root.exists():
        return True
    if root.is_dir() and not any(root.iterdir()):
        return True
    try:
        info = json.loads((root / "annotations" / "instances_train.json").read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    return str(info.get("version", "")).startswith("kd-synthetic")


def _render_split(cfg: SyntheticConfig, split: str, out_dir: Path, workers: int) -> list[dict]:
    """Render all images of a split into ``out_dir`` with ``workers`` processes; ordered records."""
    count = cfg.num_train if split == "train" else cfg.num_val
    jobs = [(cfg, split, i, str(out_dir)) for i in range(count)]
    if workers <= 1:
        return [_render_job(j) for j in jobs]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_render_job, jobs, chunksize=max(1, min(32, count // (4 * workers))))


def generate(cfg: SyntheticConfig, root: Path, workers: int | None = None) -> dict:
    """Write the dataset to ``root`` atomically and return a summary.

    Layout: ``<root>/annotations/instances_{train,val}.json`` and ``<root>/{train,val}/NNNNNN.png``.
    Everything is written to a temporary sibling directory, validated with ``kd.data.validate``, then
    renamed over ``root``. If ``root`` already holds a complete dataset with the same config hash,
    nothing is written (``skipped: True``). A ``root`` that holds anything else than a dataset of this
    generator is never replaced (ValueError).

    Args:
        cfg: generator settings.
        root: output directory.
        workers: processes (default ``min(os.cpu_count(), 8)``); the output does not depend on it.

    Returns:
        ``{"root", "skipped", "config_hash", "images": {split: n}, "annotations": {split: n},
        "buckets": {small, medium, large fractions over both splits}}``.
    """
    from kd.data.validate import validate_coco

    root = Path(root)
    digest = cfg.config_hash()
    summary = {"root": str(root), "config_hash": digest}
    if _existing_hash(root) == digest:
        data = [json.loads((root / "annotations" / f"instances_{s}.json").read_text()) for s in SPLITS]
        return {**summary, "skipped": True, **_summarise(data)}
    if not _is_replaceable(root):
        raise ValueError(f"{root}: exists and is not a kd synthetic dataset; refusing to overwrite it")
    workers = workers or min(os.cpu_count() or 1, 8)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "annotations").mkdir(parents=True)
        data = []
        for split in SPLITS:
            (tmp / split).mkdir()
            coco = _coco_json(cfg, split, _render_split(cfg, split, tmp / split, workers))
            ann_file = tmp / "annotations" / f"instances_{split}.json"
            ann_file.write_text(json.dumps(coco, separators=(",", ":")))
            validate_coco(ann_file, tmp / split, check_images="exists")
            data.append(coco)
        _replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "skipped": False, **_summarise(data)}


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, moving an existing ``dst`` aside first and deleting it after."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _summarise(data: list[dict]) -> dict:
    """Counts per split and size-bucket fractions over all annotations."""
    anns = [a for d in data for a in d["annotations"]]
    return {
        "images": {d["info"]["split"]: len(d["images"]) for d in data},
        "annotations": {d["info"]["split"]: len(d["annotations"]) for d in data},
        "buckets": bucket_fractions(anns),
    }
