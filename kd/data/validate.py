"""Checks of a COCO instances annotation file and its image folder, with one-line error messages.

Every problem raises ``ValueError("<file>: <record>: <what is wrong>")``, e.g.
``data/x.json: annotation id 17: bbox width <= 0 ([3, 4, 0, 5])``, so a command line can print it as is.
"""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path

from PIL import Image

_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED = {
    "image": ("id", "file_name", "width", "height"),
    "annotation": ("id", "image_id", "category_id", "bbox", "area"),
    "category": ("id", "name"),
}
BOX_TOLERANCE = 1.0  # pixels a box may extend past the image border


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _load_json(ann_file: Path) -> dict:
    """Parse the annotation file; missing file, invalid JSON and a non-object top level are errors."""
    try:
        text = ann_file.read_text()
    except OSError as e:
        raise ValueError(f"{ann_file}: cannot read annotation file ({_one_line(e.strerror or e)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: invalid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED_TOP if k not in data]
    if missing:
        raise ValueError(f"{ann_file}: missing top-level key(s) {missing}")
    for key in _REQUIRED_TOP:
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _check_records(ann_file: Path, kind: str, records: list) -> None:
    """Each record is an object with the required keys and an integer id."""
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{ann_file}: {kind} #{i}: must be a JSON object, got {type(rec).__name__}")
        name = f"{kind} id {rec['id']}" if "id" in rec else f"{kind} #{i}"
        missing = [k for k in _REQUIRED[kind] if k not in rec]
        if missing:
            raise ValueError(f"{ann_file}: {name}: missing key(s) {missing}")
        if not isinstance(rec["id"], int) or isinstance(rec["id"], bool):
            raise ValueError(f"{ann_file}: {name}: id must be an integer ({rec['id']!r})")


def _unique_ids(ann_file: Path, kind: str, records: list[dict]) -> dict[int, dict]:
    by_id: dict[int, dict] = {}
    for rec in records:
        if rec["id"] in by_id:
            raise ValueError(f"{ann_file}: {kind} id {rec['id']}: duplicate id")
        by_id[rec["id"]] = rec
    return by_id


def _check_image_record(ann_file: Path, img: dict) -> None:
    for key in ("width", "height"):
        value = img[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{ann_file}: image id {img['id']}: {key} must be a positive integer ({value!r})"
            )
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        raise ValueError(f"{ann_file}: image id {img['id']}: file_name must be a non-empty string")


def _check_bbox(ann_file: Path, ann: dict, img: dict, degenerate: str) -> None:
    """bbox is 4 numbers, positive size (zero allowed when ``degenerate='skip'``), inside the image."""
    name, box = f"annotation id {ann['id']}", ann["bbox"]
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise ValueError(f"{ann_file}: {name}: bbox must be 4 numbers [x, y, w, h] ({box!r})")
    x, y, w, h = box
    for label, size in (("width", w), ("height", h)):
        if size < 0 or (size == 0 and degenerate != "skip"):
            raise ValueError(f"{ann_file}: {name}: bbox {label} <= 0 ({box})")
    W, H, tol = img["width"], img["height"], BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
        raise ValueError(f"{ann_file}: {name}: bbox {box} outside image id {img['id']} of size {W}x{H}")


def _is_number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_annotations(ann_file: Path, data: dict, images: dict, cats: dict, degenerate: str) -> None:
    for ann in data["annotations"]:
        name = f"annotation id {ann['id']}"
        if ann["image_id"] not in images:
            raise ValueError(f"{ann_file}: {name}: image_id {ann['image_id']!r} not in images")
        if ann["category_id"] not in cats:
            raise ValueError(f"{ann_file}: {name}: category_id {ann['category_id']!r} not in categories")
        if not _is_number(ann["area"]) or ann["area"] < 0:
            raise ValueError(f"{ann_file}: {name}: area must be a number >= 0 ({ann['area']!r})")
        _check_bbox(ann_file, ann, images[ann["image_id"]], degenerate)


def _check_image_files(ann_file: Path, img_dir: Path, images: list[dict], mode: bool | str) -> None:
    """Every image file exists; with ``mode=True`` it also opens, verifies and has the stated size."""
    for img in images:
        path = img_dir / img["file_name"]
        name = f"image id {img['id']} ({img['file_name']!r})"
        if not path.is_file():
            raise ValueError(f"{ann_file}: {name}: missing image file {path}")
        if mode == "exists":
            continue
        try:
            with Image.open(path) as im:
                size = im.size
                im.verify()
        except Exception as e:  # PIL raises many types for broken files
            raise ValueError(f"{ann_file}: {name}: corrupt image file {path} ({_one_line(e)})") from None
        if size != (img["width"], img["height"]):
            raise ValueError(
                f"{ann_file}: {name}: image file is {size[0]}x{size[1]}, annotation says "
                f"{img['width']}x{img['height']}"
            )


def validate_coco(
    ann_file: str | Path,
    img_dir: str | Path,
    check_images: bool | str = True,
    degenerate: str = "error",
) -> dict:
    """Validate a COCO instances file and its images; return the parsed JSON dict.

    Args:
        ann_file: ``instances_*.json``.
        img_dir: folder the ``file_name`` of each image is relative to.
        check_images: True: every file exists, opens, passes ``PIL.Image.verify()`` and has the size the
            JSON states; "exists": existence only (fast, for large datasets); False: no file checks.
        degenerate: "error": a bbox with zero width or height is an error; "skip": allowed (the dataset
            drops such boxes; real COCO 2017 train holds two with height 0). Negative sizes are always
            errors.

    Raises:
        ValueError: one line naming the file and the offending record.
    """
    ann_file, img_dir = Path(ann_file), Path(img_dir)
    if check_images not in (True, False, "exists"):
        raise ValueError(f"check_images must be True, False or 'exists', got {check_images!r}")
    if degenerate not in ("error", "skip"):
        raise ValueError(f"degenerate must be 'error' or 'skip', got {degenerate!r}")
    data = _load_json(ann_file)
    for kind, key in (("image", "images"), ("annotation", "annotations"), ("category", "categories")):
        _check_records(ann_file, kind, data[key])
    if not data["images"]:
        raise ValueError(f"{ann_file}: empty split (no images)")
    if not data["categories"]:
        raise ValueError(f"{ann_file}: no categories")
    images = _unique_ids(ann_file, "image", data["images"])
    cats = _unique_ids(ann_file, "category", data["categories"])
    _unique_ids(ann_file, "annotation", data["annotations"])
    for img in data["images"]:
        _check_image_record(ann_file, img)
    _check_annotations(ann_file, data, images, cats, degenerate)
    if check_images:
        if not img_dir.is_dir():
            raise ValueError(f"{ann_file}: image folder {img_dir} does not exist")
        _check_image_files(ann_file, img_dir, data["images"], check_images)
    return data
