"""Tests of kd/data/synthetic.py: determinism, COCO schema, categories, counts and size buckets."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from kd.data.synthetic import (
    APPEARANCES,
    CATEGORIES,
    CATEGORY_PARTS,
    SyntheticConfig,
    bucket_fractions,
    generate,
    render_image,
)

TINY = SyntheticConfig(seed=0, num_train=8, num_val=4)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(TINY, root, workers=1)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_layout(tiny_root):
    assert len(list((tiny_root / "train").glob("*.png"))) == 8
    assert len(list((tiny_root / "val").glob("*.png"))) == 4
    assert [p.name for p in tiny_root.parent.iterdir()] == ["data"]  # no temporary folders left


def test_same_seed_is_byte_identical_whatever_the_worker_count(tiny_root, tmp_path):
    other = tmp_path / "again"
    generate(TINY, other, workers=2)
    assert _files(other) == _files(tiny_root)


def test_different_seed_differs(tiny_root, tmp_path):
    other = tmp_path / "seed1"
    generate(SyntheticConfig(seed=1, num_train=8, num_val=4), other, workers=1)
    a, b = _files(tiny_root), _files(other)
    assert a.keys() == b.keys()
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert a["train/000000.png"] != b["train/000000.png"]


def test_coco_schema(tiny_root):
    data = _load(tiny_root, "train")
    assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
    assert set(data["images"][0]) >= {"id", "file_name", "width", "height"}
    ann_keys = {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
    assert all(set(a) == ann_keys for a in data["annotations"])
    assert all(set(c) == {"id", "name", "supercategory"} for c in data["categories"])
    assert data["info"]["config"]["num_train"] == 8
    assert data["info"]["config_hash"] == TINY.config_hash()


def test_pycocotools_loads_the_output(tiny_root):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tiny_root / "annotations" / "instances_val.json"))
    assert len(coco.getImgIds()) == 4
    assert len(coco.getCatIds()) == len(CATEGORIES)
    assert len(coco.getAnnIds()) == len(_load(tiny_root, "val")["annotations"]) > 0


def test_boxes_inside_images_and_area_is_box_area(tiny_root):
    data = _load(tiny_root, "train")
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
        assert ann["area"] == w * h


def test_at_least_ten_categories_with_gapped_ids():
    ids = [c["id"] for c in CATEGORIES]
    assert len(ids) >= 10 and len(set(c["name"] for c in CATEGORIES)) == len(ids)
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # not contiguous


def test_neither_shape_nor_appearance_alone_names_the_category():
    for k, (shape, appearance) in enumerate(CATEGORY_PARTS):
        same_shape = [j for j, p in enumerate(CATEGORY_PARTS) if p[0] == shape and j != k]
        same_look = [j for j, p in enumerate(CATEGORY_PARTS) if p[1] == appearance and j != k]
        assert same_shape and same_look, CATEGORIES[k]["name"]
    colours = [a[1] for a in APPEARANCES]
    textures = [a[3] for a in APPEARANCES]
    assert len(set(colours)) < len(colours)  # some appearances differ only by texture
    assert len(set(textures)) < len(textures)  # and some only by colour


def test_object_counts_in_range(tiny_root):
    for split in ("train", "val"):
        data = _load(tiny_root, split)
        counts = {im["id"]: 0 for im in data["images"]}
        for ann in data["annotations"]:
            counts[ann["image_id"]] += 1
        assert all(TINY.min_objects <= n <= TINY.max_objects for n in counts.values()), counts


def test_size_buckets_each_hold_at_least_15_percent():
    cfg = SyntheticConfig()
    objects, sides = [], set()
    for i in range(150):
        image, objs = render_image(cfg, "train", i)
        objects += objs
        sides.add(image.shape[:2])
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
    fractions = bucket_fractions(objects)
    assert min(fractions.values()) >= 0.15, fractions
    assert len(sides) > 50  # varied sizes and aspect ratios
    assert len({o["category"] for o in objects}) == len(CATEGORIES)


def test_same_config_is_skipped(tiny_root):
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")}
    summary = generate(TINY, tiny_root, workers=1)
    assert summary["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")} == before


def test_changed_config_replaces_the_dataset(tmp_path):
    root = tmp_path / "data"
    generate(SyntheticConfig(num_train=2, num_val=1), root, workers=1)
    summary = generate(SyntheticConfig(num_train=3, num_val=1), root, workers=1)
    assert summary["skipped"] is False and summary["images"] == {"train": 3, "val": 1}
    assert len(list((root / "train").glob("*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate(SyntheticConfig(num_train=1, num_val=1), root, workers=1)
    assert (root / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("values", "match"),
    [({"bogus": 1}, "unknown key"), ({"min_objects": 0}, "min_objects"), ({"min_side": 300}, "min_side")],
)
def test_bad_config_is_a_value_error(values, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig.from_dict(values)


def test_cocoeval_scores_the_ground_truth_as_perfect(tiny_root):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tiny_root / "annotations" / "instances_train.json"))
        dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
        evaluator = COCOeval(
            gt,
            gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets]),
            "bbox",
        )
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
