"""Tests of kd/data/validate.py and the command line: one test per kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from kd.data.__main__ import main
from kd.data.coco import CocoDetection
from kd.data.validate import validate_coco


def _valid() -> dict:
    return {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 2, "file_name": "b.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 16, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 17, "image_id": 2, "category_id": 7, "bbox": [3, 4, 6, 5], "area": 30, "iscrowd": 0},
        ],
        "categories": [{"id": 4, "name": "a"}, {"id": 7, "name": "b"}],
    }


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    """(ann_file, img_dir) of a valid two-image split."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for img in _valid()["images"]:
        Image.new("RGB", (img["width"], img["height"]), (9, 9, 9)).save(img_dir / img["file_name"])
    ann_file = tmp_path / "x.json"
    ann_file.write_text(json.dumps(_valid()))
    return ann_file, img_dir


def _with(ann_file: Path, edit: Callable[[dict], None]) -> Path:
    data = _valid()
    edit(data)
    ann_file.write_text(json.dumps(data))
    return ann_file


def _error(ann_file: Path, img_dir: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        validate_coco(ann_file, img_dir, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{ann_file}: ") and "\n" not in message
    return message


def test_valid_split_passes(dataset):
    data = validate_coco(*dataset)
    assert len(data["images"]) == 2 and len(data["annotations"]) == 2


def test_invalid_json(dataset):
    ann_file, img_dir = dataset
    ann_file.write_text('{"images": [')
    assert "invalid JSON (line 1" in _error(ann_file, img_dir)


def test_missing_annotation_file(dataset, tmp_path):
    assert "cannot read" in _error(tmp_path / "nope.json", dataset[1])


def test_missing_top_level_key(dataset):
    ann_file = _with(dataset[0], lambda d: d.pop("annotations"))
    assert "missing top-level key(s) ['annotations']" in _error(ann_file, dataset[1])


def test_missing_key_in_image_record(dataset):
    ann_file = _with(dataset[0], lambda d: d["images"][1].pop("file_name"))
    assert "image id 2: missing key(s) ['file_name']" in _error(ann_file, dataset[1])


def test_missing_key_in_annotation_record(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][1].pop("bbox"))
    assert "annotation id 17: missing key(s) ['bbox']" in _error(ann_file, dataset[1])


def test_bbox_width_not_positive(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][1].update(bbox=[3, 4, 0, 5]))
    assert _error(ann_file, dataset[1]).endswith("annotation id 17: bbox width <= 0 ([3, 4, 0, 5])")


def test_bbox_height_negative_even_when_degenerate_boxes_are_skipped(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(bbox=[1, 1, 5, -2]))
    assert "annotation id 16: bbox height <= 0" in _error(ann_file, dataset[1], degenerate="skip")


def test_zero_height_allowed_with_degenerate_skip(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(bbox=[1, 1, 5, 0]))
    assert "annotation id 16: bbox height <= 0" in _error(ann_file, dataset[1])
    validate_coco(ann_file, dataset[1], degenerate="skip")


def test_bbox_outside_image(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(bbox=[10, 2, 11.5, 5]))
    assert "annotation id 16: bbox [10, 2, 11.5, 5] outside image id 1 of size 20x10" in _error(
        ann_file, dataset[1]
    )


def test_bbox_within_one_pixel_of_the_border_is_accepted(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(bbox=[-0.9, 2, 21.8, 5]))
    validate_coco(ann_file, dataset[1])


def test_malformed_bbox(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
    assert "annotation id 16: bbox must be 4 numbers" in _error(ann_file, dataset[1])


def test_unknown_category(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][1].update(category_id=5))
    assert "annotation id 17: category_id 5 not in categories" in _error(ann_file, dataset[1])


def test_unknown_image_id(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][0].update(image_id=99))
    assert "annotation id 16: image_id 99 not in images" in _error(ann_file, dataset[1])


def test_duplicate_image_id(dataset):
    ann_file = _with(dataset[0], lambda d: d["images"][1].update(id=1))
    assert "image id 1: duplicate id" in _error(ann_file, dataset[1])


def test_missing_image_file(dataset):
    ann_file, img_dir = dataset
    (img_dir / "b.png").unlink()
    message = _error(ann_file, img_dir)
    assert "image id 2 ('b.png'): missing image file" in message and str(img_dir / "b.png") in message
    assert "missing image file" in _error(ann_file, img_dir, check_images="exists")


def test_corrupt_image_file(dataset):
    ann_file, img_dir = dataset
    (img_dir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert "image id 1 ('a.png'): corrupt image file" in _error(ann_file, img_dir)
    validate_coco(ann_file, img_dir, check_images="exists")  # the fast mode only checks existence


def test_image_size_differs_from_the_record(dataset):
    ann_file = _with(dataset[0], lambda d: d["images"][0].update(width=30))
    assert "image id 1 ('a.png'): image file is 20x10, annotation says 30x10" in _error(ann_file, dataset[1])


def test_empty_split(dataset):
    ann_file = _with(dataset[0], lambda d: d.update(images=[], annotations=[]))
    assert "empty split (no images)" in _error(ann_file, dataset[1])


def test_dataset_validates_at_construction(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][1].update(bbox=[3, 4, 0, 5]))
    with pytest.raises(ValueError, match="annotation id 17: bbox width <= 0"):
        CocoDetection(dataset[1], ann_file)


def test_cli_check_prints_one_line_and_exits_non_zero(dataset):
    ann_file = _with(dataset[0], lambda d: d["annotations"][1].update(bbox=[3, 4, 0, 5]))
    cmd = [sys.executable, "-m", "kd.data", "check", str(ann_file), str(dataset[1])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: {ann_file}: annotation id 17: bbox width <= 0 ([3, 4, 0, 5])"
    ]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_check_accepts_a_valid_split(dataset, capsys):
    assert main(["check", str(dataset[0]), str(dataset[1])]) == 0
    assert "ok (2 images, 2 annotations, 2 categories)" in capsys.readouterr().out


def test_cli_generate_with_a_bad_setting_writes_nothing(tmp_path, capsys):
    root = tmp_path / "out"
    assert main(["generate", "--root", str(root), "--params", "missing.yaml", "--set", "min_objects=0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SyntheticConfig.min_objects" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_reads_params_and_overrides(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synthetic:\n    seed: 5\n    num_train: 2\n    num_val: 1\n")
    root = tmp_path / "out"
    assert main(["generate", "--root", str(root), "--params", str(params), "--set", "num_val=2"]) == 0
    info = json.loads((root / "annotations" / "instances_val.json").read_text())["info"]
    assert (info["config"]["seed"], info["config"]["num_train"], info["config"]["num_val"]) == (5, 2, 2)
    assert json.loads(capsys.readouterr().out)["images"] == {"train": 2, "val": 2}
