"""Figures for the notebooks and reports: annotated samples, detections and learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from pycocotools.coco import COCO


def draw_boxes(
    ax: Axes,
    boxes_xywh: list[list[float]],
    names: list[str],
    scores: list[float] | None = None,
    color: str = "lime",
) -> None:
    """Draw COCO (x, y, w, h) pixel boxes with their class names (and scores) on ``ax``."""
    for i, (x, y, w, h) in enumerate(boxes_xywh):
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.2))
        label = names[i] if scores is None else f"{names[i]} {scores[i]:.2f}"
        ax.text(
            x,
            y,
            label,
            fontsize=6,
            color="black",
            va="bottom",
            bbox=dict(facecolor=color, alpha=0.7, pad=0.5, lw=0),
        )


def show_samples(
    coco: COCO, img_dir: str | Path, image_ids: list[int], detections: list[dict] | None = None, cols: int = 4
) -> Figure:
    """A grid of images with their ground truth (green) and, if given, COCO-format detections (orange)."""
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    rows = -(-len(image_ids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img_id in zip(axes.flat, image_ids, strict=False):
        info = coco.loadImgs(img_id)[0]
        ax.imshow(Image.open(Path(img_dir) / info["file_name"]).convert("RGB"))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        draw_boxes(ax, [a["bbox"] for a in anns], [names[a["category_id"]] for a in anns])
        if detections is not None:
            dets = [d for d in detections if d["image_id"] == img_id]
            draw_boxes(
                ax,
                [d["bbox"] for d in dets],
                [names[d["category_id"]] for d in dets],
                [d["score"] for d in dets],
                color="orange",
            )
        ax.set_title(f"image {img_id} ({info['width']}x{info['height']})", fontsize=8)
    fig.tight_layout()
    return fig


def learning_curves(run_dirs: dict[str, str | Path], metric: str = "AP") -> Figure:
    """Training loss and validation ``metric`` per epoch for each run (reads ``plots/{train,val}.tsv``)."""
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, run in run_dirs.items():
        train, val = Path(run) / "plots" / "train.tsv", Path(run) / "plots" / "val.tsv"
        if train.is_file():
            t = pd.read_csv(train, sep="\t")
            ax_loss.plot(t["epoch"], t["loss"], marker=".", label=name)
        if val.is_file():
            v = pd.read_csv(val, sep="\t")
            ax_ap.plot(v["epoch"], v[metric], marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (weighted sum)", yscale="log")
    ax_ap.set(xlabel="epoch", ylabel=f"val {metric}")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_terms(run_dir: str | Path) -> Figure:
    """Each logged loss term per epoch, decoder layers summed (``loss_x_0 + loss_x_1`` -> ``loss_x``)."""
    t = pd.read_csv(Path(run_dir) / "plots" / "train.tsv", sep="\t")
    terms = [c for c in t.columns if c.startswith("loss_")]
    base = sorted({c.rstrip("0123456789").rstrip("_") for c in terms})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in base:
        cols = [c for c in terms if c == name or c.rstrip("0123456789").rstrip("_") == name]
        ax.plot(t["epoch"], t[cols].sum(axis=1), marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="weighted loss (sum over layers)", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
