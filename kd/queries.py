"""Query visualisation: which queries a detector's distillers look at, and where they attend.

The report ``reports/queries.html`` (notebook ``50_queries``) is built from these pieces:

* **QSKD Figs. 1 and 4** (methods.md §4): for a ground-truth box, the model's *positive* query (the
  Hungarian match with its own matcher costs), its *hard negatives* (the Group Query Selection group of
  that GT, :mod:`kd.distill.selection`: non-positive queries whose best GIoU, > ``tau``, is with this GT,
  ranked by that GIoU) and *easy negatives* (queries neither positive nor hard negative of any GT, with the
  lowest GIoU to this GT), each with its predicted box and its last-layer decoder cross-attention map
  (:mod:`kd.distill.attention`; deformable sampling points are splatted onto each level's grid, and the
  levels are upsampled to the image and summed).
* **KD-DETR** (methods.md §3): the distillation points, general (:func:`kd.distill.kd_detr.sample_anchors`)
  and specific (the teacher's learned queries, or its per-image proposals when two-stage), as the teacher's
  decoder receives them (first-layer reference boxes / points) and as it decodes them (final boxes, with
  the max class probability that KD-DETR uses as the point's weight).
* **DETRDistill TAFD** (methods.md §2.6): the teacher's target-aware feature masks per feature level
  (:func:`kd.distill.detrdistill.query_quality`, :func:`kd.distill.detrdistill.tafd_mask`).

Every model runs on one image at a time (batch of 1, no padding), so a token grid covers the whole image.
Boxes are normalised (cx, cy, w, h); images are [3, H, W] tensors normalised with the ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kd.distill.attention import query_attention_maps
from kd.distill.build import load_detector
from kd.distill.detrdistill import query_quality, tafd_mask
from kd.distill.kd_detr import GENERAL, SPECIFIC, box_to_embedding, query_spec, sample_anchors
from kd.distill.selection import select_groups
from kd.models.matcher import HungarianMatcher
from kd.models.outputs import DecoderOutput, DetectorOutput

KINDS = ("positive", "hard", "easy")
KIND_COLORS = {"positive": "lime", "hard": "orange", "easy": "deepskyblue"}
GT_COLOR = "white"


# ---------------------------------------------------------------------------- models


def load_available(
    params: dict, checkpoints: dict[str, tuple[str, str | Path]]
) -> tuple[dict[str, nn.Module], list[str]]:
    """Load every ``{name: (role, checkpoint)}`` whose file exists, in order.

    Returns (the loaded models by name, one line per checkpoint skipped because its file is missing).
    """
    models, skipped = {}, []
    for name, (role, path) in checkpoints.items():
        if Path(path).is_file():
            models[name] = load_detector(params, role, path)
        else:
            skipped.append(f"{name}: no checkpoint at {path}")
    return models, skipped


def sample_indices(dataset, num: int) -> list[int]:
    """The first ``num`` dataset indices whose image has at least one ground-truth box."""
    picked = []
    for i in range(len(dataset)):
        if len(picked) == num:
            break
        if len(dataset.load_target(dataset.ids[i])["boxes"]):
            picked.append(i)
    return picked


@torch.no_grad()
def run_one(
    model: nn.Module, image: Tensor, extra_queries: dict[str, Tensor] | None = None
) -> DetectorOutput:
    """Forward one image [3, H, W] (batch of 1, nothing padded) with attention maps and ``extra_queries``."""
    mask = torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
    return model(image[None], mask, extra_queries=extra_queries, return_attention=True)


# ---------------------------------------------------------------------------- selection


@dataclass
class QueryPicks:
    """The queries picked for one ground-truth box: positive (if matched), hard and easy negatives."""

    gt: int  # index of the ground-truth box in the target
    queries: Tensor  # [K] int64 query indices: the positive, then hard, then easy negatives
    kinds: list[str]  # K entries of KINDS
    giou: Tensor  # [K] GIoU of each query's predicted box with GT ``gt``


@torch.no_grad()
def select_queries(
    logits: Tensor,
    boxes: Tensor,
    target: dict[str, Tensor],
    matcher: HungarianMatcher,
    k_hard: int = 2,
    k_easy: int = 2,
    tau: float = 0.0,
    max_gt: int | None = None,
) -> list[QueryPicks]:
    """Positive, hard-negative and easy-negative queries of each ground-truth box of one image.

    The positive is the Hungarian match (``matcher``) and the hard negatives are QSKD's Group Query
    Selection group of the GT (:func:`kd.distill.selection.select_groups`), the ``k_hard`` of highest GIoU.
    Easy negatives: the ``k_easy`` queries of lowest GIoU with the GT among those neither positive nor hard
    negative (among all non-positives when every one is a hard negative). Ties go to the lowest index.

    Args:
        logits: [Q, C] class logits; boxes: [Q, 4] normalised cxcywh (one decoder layer, one image).
        target: ``boxes [T, 4]`` normalised cxcywh and ``labels [T]``.
        max_gt: only the first ``max_gt`` ground-truth boxes (all when None).

    Returns:
        One :class:`QueryPicks` per ground-truth box (in target order).
    """
    if k_hard < 0 or k_easy < 0:
        raise ValueError(f"queries: k_hard and k_easy must be >= 0, got {k_hard}, {k_easy}")
    sel = select_groups(logits, boxes, target, matcher=matcher, tau=tau)
    if sel.num_gt == 0:
        return []
    giou = generalized_box_iou(
        box_convert(boxes.detach().float().cpu(), "cxcywh", "xyxy"),
        box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy"),
    )  # [Q, T]
    positive = torch.zeros(sel.num_queries, dtype=torch.bool)
    positive[sel.positives[:, 0]] = True
    easy_pool = ~positive
    easy_pool[sel.hard_negatives[:, 0]] = False
    if not easy_pool.any():
        easy_pool = ~positive
    pool = easy_pool.nonzero().squeeze(1)
    picks = []
    for j, (pos, hard) in enumerate(sel.groups()[:max_gt]):
        hard = hard[giou[hard, j].argsort(descending=True, stable=True)][:k_hard]
        easy = pool[giou[pool, j].argsort(stable=True)][:k_easy]
        queries = torch.cat([pos, hard, easy])
        kinds = ["positive"] * len(pos) + ["hard"] * len(hard) + ["easy"] * len(easy)
        picks.append(QueryPicks(j, queries, kinds, giou[queries, j]))
    return picks


# ---------------------------------------------------------------------------- attention


def valid_grids(out: DetectorOutput, batch_index: int = 0) -> list[tuple[int, int, int, int]]:
    """Per feature level (H_v, W_v, valid rows, valid columns) of image ``batch_index``'s token grid."""
    grids = []
    for (h, w), m in zip(out.spatial_shapes.tolist(), out.feature_masks, strict=True):
        valid = ~m[batch_index]
        grids.append((h, w, int(valid.any(1).sum()), int(valid.any(0).sum())))
    return grids


def grid_to_image(
    tokens: Tensor, out: DetectorOutput, image_hw: tuple[int, int], batch_index: int = 0
) -> Tensor:
    """Token maps [K, S] (levels flattened in memory order) -> image maps [K, H, W], mass preserved.

    Each level's valid (unpadded) cells are upsampled bilinearly to the image and rescaled so that the level
    keeps its mass per query; levels are summed. Mass on padded cells is dropped. The grid of stride s
    covers ceil(H / s) * s >= H pixels, so a map may be shifted by less than a cell.
    """
    maps, start = tokens.new_zeros(tokens.shape[0], *image_hw), 0
    for h, w, vh, vw in valid_grids(out, batch_index):
        level = tokens[:, start : start + h * w].view(-1, h, w)[:, :vh, :vw]
        start += h * w
        mass = level.sum((1, 2))
        up = F.interpolate(level[:, None].float(), size=image_hw, mode="bilinear", align_corners=False)[:, 0]
        up = up.clamp(min=0)
        maps += up * (mass / up.sum((1, 2)).clamp(min=1e-12))[:, None, None]
    return maps


def attention_maps(
    out: DetectorOutput,
    queries: Tensor,
    image_hw: tuple[int, int],
    group: str | None = None,
    layer: int = -1,
    batch_index: int = 0,
) -> Tensor:
    """Head-averaged decoder cross-attention maps of some queries, on the image.

    Args:
        out: a detector output computed with ``return_attention=True``.
        queries: [K] int64 query indices of the group (``None``: the detection queries; else
            ``out.extra[group]``).
        image_hw: (H, W) of the (unpadded) image.
        layer: decoder layer (default the last).

    Returns:
        [K, H, W] float32, non-negative: each query's attention mass over the image (sums to 1 for dense
        attention; to the mass its sampling points put inside the maps for deformable attention).
    """
    dec = out.detection if group is None else out.extra[group]
    tokens = query_attention_maps(dec, layer, out.spatial_shapes)[batch_index, queries.to(torch.long)]
    return grid_to_image(tokens, out, image_hw, batch_index)


def foreground_mass(maps: Tensor, box: Tensor) -> Tensor:
    """Fraction of each map's mass inside a box: maps [K, H, W], box [4] normalised cxcywh -> [K]."""
    h, w = maps.shape[-2:]
    x0, y0, x1, y1 = box_convert(box.float()[None], "cxcywh", "xyxy")[0].tolist()
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None]
    total = maps.sum((1, 2))
    return (maps * inside).sum((1, 2)) / total.clamp(min=1e-12)


@dataclass
class QueryView:
    """What the report shows of the picked queries of one GT for one model."""

    picks: QueryPicks
    boxes: Tensor  # [K, 4] predicted boxes, normalised cxcywh
    scores: Tensor  # [K] max class probability
    maps: Tensor  # [K, H, W] last-layer cross-attention maps on the image
    foreground: Tensor  # [K] fraction of each map inside the GT box


def query_views(
    out: DetectorOutput,
    target: dict[str, Tensor],
    matcher: HungarianMatcher,
    image_hw: tuple[int, int],
    k_hard: int = 2,
    k_easy: int = 2,
    tau: float = 0.0,
    max_gt: int | None = None,
    layer: int = -1,
) -> list[QueryView]:
    """:func:`select_queries` on decoder layer ``layer`` of a one-image output, with boxes, scores and
    attention maps of the picked queries: one :class:`QueryView` per ground-truth box."""
    logits, boxes = out.detection.logits[layer, 0], out.detection.boxes[layer, 0]
    views = []
    for picks in select_queries(logits, boxes, target, matcher, k_hard, k_easy, tau, max_gt):
        maps = attention_maps(out, picks.queries, image_hw, layer=layer)
        views.append(
            QueryView(
                picks=picks,
                boxes=boxes[picks.queries].float(),
                scores=logits[picks.queries].float().sigmoid().amax(-1),
                maps=maps,
                foreground=foreground_mass(maps, target["boxes"][picks.gt]),
            )
        )
    return views


def summary_table(views: dict[str, list[list[QueryView]]]) -> pd.DataFrame:
    """Per model (rows) and query kind: the number of picked queries, their mean GIoU with the GT and the
    mean fraction of their attention inside the GT box. ``views``: {model: per image, the list of
    :func:`query_views`}. Returns a pandas DataFrame with (statistic, kind) columns."""
    rows = [
        {
            "model": name,
            "kind": kind,
            "GIoU": float(v.picks.giou[k]),
            "in-box attention": float(v.foreground[k]),
        }
        for name, per_image in views.items()
        for image_views in per_image
        for v in image_views
        for k, kind in enumerate(v.picks.kinds)
    ]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    table = df.pivot_table(
        index="model", columns="kind", values=["GIoU", "in-box attention"], aggfunc="mean", sort=False
    )
    counts = df.pivot_table(index="model", columns="kind", values="GIoU", aggfunc="count", sort=False)
    table = pd.concat({"queries": counts, **{c: table[c] for c in ("GIoU", "in-box attention")}}, axis=1)
    kinds = [k for k in KINDS if k in df["kind"].unique()]
    return table.reindex(columns=kinds, level=1).reindex(list(views))


# ---------------------------------------------------------------------------- KD-DETR points


@torch.no_grad()
def general_points(teacher: nn.Module, num: int, distribution: str = "normal", seed: int = 0) -> Tensor:
    """One draw of KD-DETR general points in the teacher's query format: [1, M, 4] unsigmoided anchors for
    a "box" teacher, their sine embedding [1, M, K] for an "embed" one (``embed_points: sine``; with
    ``auto`` and two "embed" models of one width, training samples raw embeddings instead)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        anchors = sample_anchors(num, distribution)
    fmt, width = query_spec(teacher)
    return anchors if fmt == "box" else box_to_embedding(anchors, width)


def point_queries(teacher: nn.Module, num_general: int, distribution: str = "normal", seed: int = 0) -> dict:
    """The extra query groups to decode for the KD-DETR view: general points, and the teacher's learned
    queries when it has some (a two-stage teacher's specific points are its detection queries)."""
    groups = {GENERAL: general_points(teacher, num_general, distribution, seed)}
    native = teacher.native_queries()
    if native is not None:
        groups[SPECIFIC] = native.detach()[None]
    return groups


@dataclass
class PointSet:
    """A group of distillation points of one image, before and after the teacher decodes them."""

    references: Tensor  # [M, 2|4] normalised reference points / boxes the first decoder layer received
    boxes: Tensor  # [M, 4] the teacher's final boxes, normalised cxcywh
    scores: Tensor  # [M] max class probability (KD-DETR's foreground weight of the point)


def point_sets(out: DetectorOutput) -> dict[str, PointSet]:
    """KD-DETR point groups of a one-image teacher output run with :func:`point_queries`' groups:
    ``{"general", "specific"}`` (specific = the detection group when the teacher has no learned queries)."""
    groups = {"general": out.extra.get(GENERAL), "specific": out.extra.get(SPECIFIC, out.detection)}

    def one(dec: DecoderOutput) -> PointSet:
        return PointSet(
            dec.references[0, 0].float(),
            dec.boxes[-1, 0].float(),
            dec.logits[-1, 0].float().sigmoid().amax(-1),
        )

    return {name: one(dec) for name, dec in groups.items() if dec is not None}


# ---------------------------------------------------------------------------- DETRDistill TAFD


@torch.no_grad()
def tafd_masks(
    out: DetectorOutput, target: dict[str, Tensor], topk: int, mask_min: float = 0.01, layer: int = -1
) -> list[Tensor]:
    """DETRDistill's target-aware masks of a one-image teacher output, one per feature level.

    Args:
        out: teacher output (``features`` are the projected encoder inputs TAFD distils).
        target: the image's ``boxes`` (normalised cxcywh) and ``labels``.
        topk: teacher (query, class) pairs kept (``distill.detrdistill.tafd_topk``).
        layer: the teacher decoder layer whose queries build the mask (TAFD uses every layer).

    Returns:
        V x [h_v, w_v] masks in (0, 1] on each level's valid (unpadded) cells.
    """
    dec = out.detection
    quality, emb = query_quality(dec.logits[layer], dec.boxes[layer], dec.hidden[layer], [target], topk)
    masks = []
    for feature, (_, _, vh, vw) in zip(out.features, valid_grids(out), strict=True):
        masks.append(tafd_mask(quality, emb, feature, mask_min)[0, 0, :vh, :vw])
    return masks


# ---------------------------------------------------------------------------- plots


def to_rgb(image: Tensor) -> np.ndarray:
    """An ImageNet-normalised image [3, H, W] -> [H, W, 3] float array in [0, 1] for ``imshow``."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def draw_box(ax: Axes, box: Tensor, hw: tuple[int, int], color: str, alpha: float = 1.0, **kw) -> None:
    """Draw a normalised cxcywh box [4] on an image of size ``hw`` = (H, W)."""
    h, w = hw
    x0, y0, x1, y1 = box_convert(box.float()[None], "cxcywh", "xyxy")[0].tolist()
    rect = Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, edgecolor=color, alpha=alpha)
    rect.set(**{"linewidth": 1.2, **kw})
    ax.add_patch(rect)


def _show(ax: Axes, rgb: np.ndarray, heat: np.ndarray | None = None, normalise: bool = True) -> None:
    """The image, and over it ``heat`` [h, w] (any grid, stretched to the image) in ``jet``, opaque where
    high and transparent where low; ``normalise`` divides it by its maximum first (else it is in [0, 1])."""
    h, w = rgb.shape[:2]
    ax.imshow(rgb, extent=(0, w, h, 0))
    if heat is not None:
        heat = heat / max(float(heat.max()), 1e-12) if normalise else heat.clip(0, 1)
        ax.imshow(heat, cmap="jet", alpha=0.75 * heat**0.6, vmin=0, vmax=1, extent=(0, w, h, 0))
    ax.set(xlim=(0, w), ylim=(h, 0), xticks=[], yticks=[])


def plot_query_groups(
    image: Tensor, gt_box: Tensor, views: dict[str, QueryView | None], title: str = ""
) -> Figure:
    """QSKD Fig. 1 style grid: one row per model, one column per picked query (positive, hard, easy).

    Each panel: the image, the query's attention map (normalised to its maximum), the GT box (white,
    dashed) and the query's predicted box (green positive, orange hard, blue easy); the title gives the
    query index, its GIoU with the GT, its max class probability and the attention mass inside the GT box.
    A ``None`` view (the model picked nothing for this GT) leaves its row empty.
    """
    rgb, hw = to_rgb(image), tuple(image.shape[-2:])
    cols = max([len(v.picks.queries) for v in views.values() if v is not None] + [1])
    fig, axes = plt.subplots(
        len(views), cols, figsize=(1.9 * cols, 2.1 * len(views)), squeeze=False, layout="constrained"
    )
    for row, (name, view) in zip(axes, views.items(), strict=True):
        for ax in row:
            ax.axis("off")
        if view is None:
            row[0].text(0.5, 0.5, f"{name}: nothing selected", ha="center", va="center", fontsize=8)
            continue
        for k, ax in enumerate(row[: len(view.picks.queries)]):
            kind = view.picks.kinds[k]
            ax.axis("on")
            _show(ax, rgb, view.maps[k].numpy())
            draw_box(ax, gt_box, hw, GT_COLOR, linestyle="--")
            draw_box(ax, view.boxes[k], hw, KIND_COLORS[kind], linewidth=1.6)
            ax.set_title(
                f"{kind} q{int(view.picks.queries[k])}\nGIoU {float(view.picks.giou[k]):.2f} · "
                f"p {float(view.scores[k]):.2f} · in-box {float(view.foreground[k]):.2f}",
                fontsize=7,
                color="black",
            )
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _draw_points(ax: Axes, refs: Tensor, hw: tuple[int, int], color: str) -> None:
    h, w = hw
    if refs.shape[-1] == 4:
        for box in refs:
            draw_box(ax, box, hw, color, alpha=0.35, linewidth=0.6)
    ax.scatter(refs[:, 0] * w, refs[:, 1] * h, s=6, c=color, edgecolors="none")


def plot_points(
    images: list[Tensor], sets: list[dict[str, PointSet]], gt_boxes: list[Tensor] | None = None
) -> Figure:
    """KD-DETR distillation points: one row per image, for each group (general, specific) two panels: the
    points as the teacher's decoder receives them (reference boxes and centres) and the teacher's decoded
    boxes, coloured and faded by their max class probability (the KD-DETR point weight)."""
    names = sorted({n for s in sets for n in s}, key=["general", "specific"].index)
    cols = 2 * len(names)
    fig, axes = plt.subplots(
        len(images), cols, figsize=(2.6 * cols, 2.6 * len(images)), squeeze=False, layout="constrained"
    )
    cmap = plt.get_cmap("viridis")
    for i, (image, row) in enumerate(zip(images, axes, strict=True)):
        rgb, hw = to_rgb(image), tuple(image.shape[-2:])
        for g, name in enumerate(names):
            ax_in, ax_out = row[2 * g], row[2 * g + 1]
            for ax in (ax_in, ax_out):
                _show(ax, rgb)
                for box in [] if gt_boxes is None else gt_boxes[i]:
                    draw_box(ax, box, hw, GT_COLOR, linestyle="--")
            if name not in sets[i]:
                continue
            ps = sets[i][name]
            _draw_points(ax_in, ps.references, hw, "magenta" if name == "general" else "cyan")
            for box, score in sorted(zip(ps.boxes, ps.scores.tolist(), strict=True), key=lambda t: t[1]):
                draw_box(ax_out, box, hw, cmap(score), alpha=0.15 + 0.85 * score)
            for ax in (ax_in, ax_out):  # boxes may reach outside the image
                ax.set(xlim=(0, hw[1]), ylim=(hw[0], 0))
            if i == 0:
                ax_in.set_title(f"{name} points ({len(ps.boxes)}): input", fontsize=8)
                ax_out.set_title(f"{name}: teacher's boxes (colour = max prob)", fontsize=8)
    fig.colorbar(
        plt.cm.ScalarMappable(cmap=cmap), ax=axes[:, -1].tolist(), shrink=0.6, label="max class prob"
    )
    return fig


def plot_tafd_masks(
    images: list[Tensor], masks: list[list[Tensor]], gt_boxes: list[Tensor] | None = None
) -> Figure:
    """DETRDistill TAFD masks: one row per image; the image with its GT boxes, then one panel per feature
    level with the teacher's target-aware mask over the image (each level's grid stretched to the image)."""
    levels = max(len(m) for m in masks)
    fig, axes = plt.subplots(
        len(images), levels + 1, figsize=(2.4 * (levels + 1), 2.4 * len(images)), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for i, (image, row) in enumerate(zip(images, axes, strict=True)):
        rgb, hw = to_rgb(image), tuple(image.shape[-2:])
        _show(row[0], rgb)
        for box in [] if gt_boxes is None else gt_boxes[i]:
            draw_box(row[0], box, hw, GT_COLOR, linestyle="--")
        for v, ax in enumerate(row[1:]):
            ax.axis("off")
            if v >= len(masks[i]):
                continue
            ax.axis("on")
            m = masks[i][v]
            _show(ax, rgb, m.numpy(), normalise=False)
            ax.set_title(f"level {v} ({m.shape[0]}x{m.shape[1]}), min {float(m.min()):.2f}", fontsize=7)
        if i == 0:
            row[0].set_title("image + GT", fontsize=8)
    return fig
