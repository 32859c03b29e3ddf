"""Run a trained detector on validation images and return COCO-format detections (for the reports)."""

from __future__ import annotations

from pathlib import Path

import torch
from pycocotools.coco import COCO

from kd.checkpoint import load_checkpoint, load_model_state
from kd.config import model_config
from kd.data.coco import build_dataset, collate_fn
from kd.evaluation import to_coco_results
from kd.models import build_model
from kd.models.postprocess import PostProcess


@torch.no_grad()
def predict(
    params: dict, role: str, checkpoint: str | Path, num_images: int = 8, batch_size: int = 8
) -> tuple[COCO, Path, list[dict]]:
    """Detections of the ``role`` model at ``checkpoint`` on the first ``num_images`` validation images
    (sorted by id). Returns (the split's COCO, its image directory, COCO result records)."""
    data = params["data"]
    dataset = build_dataset(
        data["root"], "val", data.get("transforms") or {}, train=False, preset=data.get("name", "synthetic")
    )
    model = build_model(model_config(params, role))
    load_model_state(model, load_checkpoint(checkpoint)["model"], checkpoint)
    model.eval()
    postprocess = PostProcess(num_select=100)
    predictions = {}
    indices = list(range(min(num_images, len(dataset))))
    for start in range(0, len(indices), batch_size):
        images, mask, targets = collate_fn([dataset[i] for i in indices[start : start + batch_size]])
        out = model(images, mask)
        sizes = torch.stack([t["orig_size"] for t in targets])
        for t, p in zip(targets, postprocess(out.logits, out.boxes, sizes), strict=True):
            predictions[int(t["image_id"])] = p
    return dataset.coco, Path(dataset.img_dir), to_coco_results(predictions, dataset.label_to_cat_id)
