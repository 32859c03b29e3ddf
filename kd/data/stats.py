"""Summaries of a COCO-format dataset: objects per category, per COCO size bucket, per image."""

from __future__ import annotations

import pandas as pd
from pycocotools.coco import COCO

from kd.data.synthetic import size_bucket


def annotation_table(coco: COCO) -> pd.DataFrame:
    """One row per annotation: image_id, category name, area, size bucket, box width and height."""
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    rows = [
        {
            "image_id": a["image_id"],
            "category": names[a["category_id"]],
            "area": a["bbox"][2] * a["bbox"][3],
            "bucket": size_bucket(a["bbox"][2] * a["bbox"][3]),
            "w": a["bbox"][2],
            "h": a["bbox"][3],
        }
        for a in coco.dataset["annotations"]
    ]
    return pd.DataFrame(rows)


def summary(coco: COCO) -> dict[str, float]:
    """Headline numbers: images, objects, categories, objects per image, share of each size bucket."""
    table = annotation_table(coco)
    n = max(len(table), 1)
    per_image = table.groupby("image_id").size() if len(table) else pd.Series(dtype=float)
    out = {
        "images": len(coco.getImgIds()),
        "objects": len(table),
        "categories": len(coco.getCatIds()),
        "objects_per_image_min": int(per_image.min()) if len(per_image) else 0,
        "objects_per_image_max": int(per_image.max()) if len(per_image) else 0,
        "objects_per_image_mean": float(per_image.mean()) if len(per_image) else 0.0,
    }
    for bucket in ("small", "medium", "large"):
        out[f"share_{bucket}"] = float((table["bucket"] == bucket).sum() / n) if len(table) else 0.0
    return out
