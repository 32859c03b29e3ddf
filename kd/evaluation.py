"""COCO box evaluation with faster-coco-eval (its pycocotools-compatible ``COCOeval_faster``).

Metrics are the twelve numbers of ``COCOeval.summarize()`` in percent (0..100): AP, AP50, AP75, APs, APm,
APl, AR1, AR10, AR100, ARs, ARm, ARl. A metric COCO leaves undefined (no ground truth in that size range)
is reported as -1, as pycocotools does.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from torch import Tensor
from torchvision.ops import box_convert

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Swallow faster-coco-eval's progress messages."""


def load_coco(coco_gt: Any) -> FastCOCO:
    """A faster-coco-eval ``COCO`` from a path, a COCO-format dict, or a (pycocotools) ``COCO`` object.

    Objects and dicts are deep-copied so that evaluation never modifies the caller's annotations.
    """
    if isinstance(coco_gt, FastCOCO):
        return coco_gt
    if isinstance(coco_gt, str | os.PathLike):
        return FastCOCO(os.fspath(coco_gt), print_function=_quiet)
    dataset = coco_gt if isinstance(coco_gt, dict) else getattr(coco_gt, "dataset", None)
    if not isinstance(dataset, dict) or "images" not in dataset:
        raise ValueError(f"evaluation: cannot read COCO ground truth from {type(coco_gt).__name__}")
    return FastCOCO(copy.deepcopy(dataset), print_function=_quiet)


def evaluate_detections(
    coco_gt: Any, detections: list[dict], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """COCO bbox metrics of ``detections``.

    Args:
        coco_gt: ground truth (a COCO json path, a COCO dict, a pycocotools or faster-coco-eval ``COCO``).
        detections: COCO results, dicts with ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in pixels
            of the original image, ``score``.
        image_ids: evaluate on these images only (default: every image of ``coco_gt``).

    Returns:
        ``{name: value}`` for the names in :data:`METRICS`, in percent; -1 where COCO leaves it undefined.
    """
    gt = load_coco(coco_gt)
    known = set(gt.getImgIds())
    for k, det in enumerate(detections):
        if det.get("image_id") not in known:
            raise ValueError(f"evaluation: detection {k} has image_id {det.get('image_id')!r} not in the GT")
    dt = gt.loadRes([dict(d) for d in detections])
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
    if image_ids is not None:
        ev.params.imgIds = sorted({int(i) for i in image_ids})
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(METRICS, ev.stats, strict=False)}


def to_coco_results(
    predictions: Mapping[int, dict[str, Tensor]], label_to_cat_id: Mapping[int, int] | Sequence[int]
) -> list[dict]:
    """Convert post-processed predictions to COCO result records.

    Args:
        predictions: ``{image_id: {"scores": [K], "labels": [K], "boxes": [K, 4] absolute xyxy}}`` (the
            output of :class:`kd.models.postprocess.PostProcess` for the original image size).
        label_to_cat_id: contiguous label -> COCO ``category_id``.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with plain Python numbers.
    """
    results = []
    for image_id, pred in predictions.items():
        boxes = box_convert(pred["boxes"].detach().cpu().double(), "xyxy", "xywh").tolist()
        scores = pred["scores"].detach().cpu().double().tolist()
        labels = pred["labels"].detach().cpu().tolist()
        for box, score, label in zip(boxes, scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id[label]),
                    "bbox": box,
                    "score": score,
                }
            )
    return results


class CocoEvaluator:
    """Accumulates detections over an evaluation loop and computes COCO metrics (DDP-aware).

    Under torch.distributed every rank calls :meth:`update` on its shard and :meth:`summarize` on all ranks;
    results are gathered with ``all_gather_object`` (duplicate images from padded samplers count once).
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Mapping[int, int] | Sequence[int]) -> None:
        self.coco_gt = load_coco(coco_gt)
        self.label_to_cat_id = label_to_cat_id
        self.results: dict[int, list[dict]] = {}

    def reset(self) -> None:
        """Forget all accumulated detections."""
        self.results = {}

    def update(self, targets: list[dict[str, Any]], postprocessed: list[dict[str, Tensor]]) -> None:
        """Add one batch.

        Args:
            targets: B dicts with ``image_id`` (int or 0-dim tensor).
            postprocessed: B dicts from :class:`kd.models.postprocess.PostProcess` (boxes in original pixels).
        """
        if len(targets) != len(postprocessed):
            raise ValueError(
                f"CocoEvaluator.update: {len(targets)} targets vs {len(postprocessed)} predictions"
            )
        for t, p in zip(targets, postprocessed, strict=True):
            image_id = int(t["image_id"])
            self.results[image_id] = to_coco_results({image_id: p}, self.label_to_cat_id)

    def gather(self) -> dict[int, list[dict]]:
        """All ranks' results merged (just this rank's without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.results)
        parts: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.results)
        merged: dict[int, list[dict]] = {}
        for part in parts:
            merged.update(part or {})
        return merged

    def summarize(self) -> dict[str, float]:
        """COCO metrics (see :func:`evaluate_detections`) over the images seen so far."""
        results = self.gather()
        if not results:
            raise ValueError("CocoEvaluator.summarize: no images were added with update()")
        detections = [d for dets in results.values() for d in dets]
        return evaluate_detections(self.coco_gt, detections, image_ids=results.keys())
