"""Tests for kd.evaluation: agreement with pycocotools, empty results, conversion, the accumulator."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kd.evaluation import METRICS, CocoEvaluator, evaluate_detections, load_coco, to_coco_results

CAT_IDS = [1, 3, 7]  # non-contiguous COCO category ids; label i -> CAT_IDS[i]


def _ann(i: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": crowd,
    }


def _gt() -> dict:
    """4 images, 3 categories, small (< 32^2), medium and large (> 96^2) boxes and one crowd region."""
    images = [
        {"id": 11, "width": 200, "height": 150, "file_name": "a.png"},
        {"id": 12, "width": 300, "height": 300, "file_name": "b.png"},
        {"id": 13, "width": 640, "height": 480, "file_name": "c.png"},
        {"id": 14, "width": 128, "height": 128, "file_name": "d.png"},
    ]
    anns = [
        _ann(1, 11, 1, [10, 10, 20, 20]),  # small
        _ann(2, 11, 3, [50, 40, 60, 50]),  # medium
        _ann(3, 11, 1, [120, 20, 25, 30]),  # small
        _ann(4, 12, 7, [20, 30, 150, 120]),  # large
        _ann(5, 12, 3, [200, 200, 40, 40]),  # medium
        _ann(6, 12, 1, [180, 10, 100, 80], crowd=1),  # crowd region
        _ann(7, 13, 1, [100, 100, 300, 200]),  # large
        _ann(8, 13, 7, [400, 50, 12, 15]),  # small
        _ann(9, 13, 7, [450, 300, 80, 90]),  # medium
        _ann(10, 13, 3, [10, 400, 100, 60]),  # medium
        _ann(11, 14, 3, [30, 30, 64, 64]),  # medium
    ]
    cats = [{"id": c, "name": f"c{c}"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def _detections(seed: int = 0) -> list[dict]:
    """Hand-made hits, misses, duplicates, crowd hits and wrong classes, plus jittered random boxes."""
    dets = [
        {"image_id": 11, "category_id": 1, "bbox": [11, 10, 20, 21], "score": 0.95},
        {"image_id": 11, "category_id": 1, "bbox": [12, 11, 19, 20], "score": 0.6},  # duplicate
        {"image_id": 11, "category_id": 3, "bbox": [52, 40, 55, 50], "score": 0.8},
        {"image_id": 11, "category_id": 7, "bbox": [50, 40, 60, 50], "score": 0.7},  # wrong class
        {"image_id": 12, "category_id": 7, "bbox": [25, 35, 140, 110], "score": 0.9},
        {"image_id": 12, "category_id": 1, "bbox": [190, 20, 50, 40], "score": 0.85},  # inside the crowd
        {"image_id": 12, "category_id": 3, "bbox": [100, 250, 30, 30], "score": 0.5},  # false positive
        {"image_id": 13, "category_id": 1, "bbox": [110, 95, 290, 210], "score": 0.88},
        {"image_id": 13, "category_id": 7, "bbox": [401, 52, 10, 14], "score": 0.4},
        {"image_id": 13, "category_id": 7, "bbox": [455, 310, 70, 80], "score": 0.75},
        {"image_id": 14, "category_id": 3, "bbox": [28, 33, 66, 60], "score": 0.66},
    ]
    rng = random.Random(seed)
    for ann in _gt()["annotations"]:
        for _ in range(3):
            x, y, w, h = ann["bbox"]
            jitter = [x + rng.uniform(-0.3, 0.3) * w, y + rng.uniform(-0.3, 0.3) * h]
            size = [w * rng.uniform(0.6, 1.4), h * rng.uniform(0.6, 1.4)]
            cat = ann["category_id"] if rng.random() < 0.8 else rng.choice(CAT_IDS)
            dets.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": cat,
                    "bbox": jitter + size,
                    "score": rng.random(),
                }
            )
    return dets


def _coco(gt: dict) -> COCO:
    """A pycocotools COCO holding a copy of ``gt``."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    return coco


def _pycocotools_stats(gt: dict, dets: list[dict], image_ids: list[int] | None = None) -> np.ndarray:
    coco = _coco(gt)
    ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
    if image_ids is not None:
        ev.params.imgIds = image_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def _as_array(metrics: dict[str, float]) -> np.ndarray:
    return np.array([metrics[k] / 100 if metrics[k] >= 0 else -1.0 for k in METRICS])


class TestAgainstPycocotools:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_equal_stats(self, seed):
        gt, dets = _gt(), _detections(seed)
        ours = evaluate_detections(_coco(gt), dets)
        assert list(ours) == list(METRICS)
        ref = _pycocotools_stats(gt, dets)
        assert ref[0] > 0.1 and (ref >= 0).all()  # a non-trivial case with every size bucket present
        np.testing.assert_allclose(_as_array(ours), ref, atol=1e-6, rtol=0)

    def test_image_subset(self):
        gt, dets = _gt(), _detections(0)
        subset = [11, 13]
        ours = evaluate_detections(gt, [d for d in dets if d["image_id"] in subset], image_ids=subset)
        np.testing.assert_allclose(_as_array(ours), _pycocotools_stats(gt, dets, subset), atol=1e-6, rtol=0)

    def test_gt_from_path(self, tmp_path):
        path = tmp_path / "gt.json"
        path.write_text(json.dumps(_gt()))
        dets = _detections(0)
        assert evaluate_detections(str(path), dets) == evaluate_detections(_gt(), dets)


class TestEdgeCases:
    def test_empty_detections_give_zeros(self):
        metrics = evaluate_detections(_gt(), [])
        assert metrics == dict.fromkeys(METRICS, 0.0)

    def test_inputs_not_modified(self):
        gt, dets = _gt(), _detections(0)
        coco = _coco(gt)
        before = copy.deepcopy(coco.dataset), copy.deepcopy(dets)
        evaluate_detections(coco, dets)
        assert (coco.dataset, dets) == before

    def test_unknown_image_raises(self):
        with pytest.raises(ValueError, match="image_id 99"):
            evaluate_detections(
                _gt(), [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]
            )

    def test_bad_ground_truth_raises(self):
        with pytest.raises(ValueError, match="ground truth"):
            load_coco(42)


class TestConversion:
    def test_to_coco_results(self):
        pred = {
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([2, 0]),
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
        }
        results = to_coco_results({13: pred}, CAT_IDS)
        assert {k: v for k, v in results[0].items() if k != "score"} == {
            "image_id": 13,
            "category_id": 7,
            "bbox": [10.0, 20.0, 30.0, 40.0],
        }
        assert results[0]["score"] == pytest.approx(0.9)
        assert results[1]["category_id"] == 1 and results[1]["bbox"] == [0.0, 0.0, 5.0, 5.0]
        assert all(type(v) in (int, float) for r in results for v in (r["image_id"], r["score"], *r["bbox"]))
        assert to_coco_results({13: pred}, {0: 3, 2: 1})[0]["category_id"] == 1


def _postprocessed(dets: list[dict], image_id: int) -> dict[str, torch.Tensor]:
    """The PostProcess-style dict (xyxy pixels, contiguous labels) holding ``dets`` of one image."""
    mine = [d for d in dets if d["image_id"] == image_id]
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)], dtype=torch.float64
    )
    return {
        "scores": torch.tensor([d["score"] for d in mine], dtype=torch.float64),
        "labels": torch.tensor([CAT_IDS.index(d["category_id"]) for d in mine]),
        "boxes": boxes.reshape(-1, 4),
    }


class TestCocoEvaluator:
    def test_accumulates_batches(self):
        gt, dets = _gt(), _detections(1)
        evaluator = CocoEvaluator(_coco(gt), CAT_IDS)
        for batch in ([11, 12], [13, 14]):
            targets = [{"image_id": torch.tensor(i)} for i in batch]
            evaluator.update(targets, [_postprocessed(dets, i) for i in batch])
        ours = evaluator.summarize()
        np.testing.assert_allclose(_as_array(ours), _pycocotools_stats(gt, dets), atol=1e-6, rtol=0)

    def test_subset_and_reset(self):
        gt, dets = _gt(), _detections(2)
        evaluator = CocoEvaluator(gt, CAT_IDS)
        evaluator.update([{"image_id": 12}], [_postprocessed(dets, 12)])
        evaluator.update([{"image_id": 12}], [_postprocessed(dets, 12)])  # repeated image counts once
        np.testing.assert_allclose(
            _as_array(evaluator.summarize()), _pycocotools_stats(gt, dets, [12]), atol=1e-6, rtol=0
        )
        evaluator.reset()
        with pytest.raises(ValueError, match="no images"):
            evaluator.summarize()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the DDP test: evaluate a shard, write the metrics."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, dets = _gt(), _detections(0)
        evaluator = CocoEvaluator(gt, CAT_IDS)
        shard = [[11, 13, 14], [12, 14]][rank]  # image 14 on both ranks, as a padded sampler does
        evaluator.update([{"image_id": i} for i in shard], [_postprocessed(dets, i) for i in shard])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(evaluator.summarize(), f)
    finally:
        dist.destroy_process_group()


def test_ddp_gather(tmp_path):
    """Two gloo ranks (forked) each see a shard; both get the metrics of the whole set."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    expected = _pycocotools_stats(_gt(), _detections(0))
    for rank in range(2):
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        np.testing.assert_allclose(_as_array(metrics), expected, atol=1e-6, rtol=0)
