"""Command line: generate the synthetic dataset or check a COCO annotation file.

    python -m kd.data generate --root data/synthetic [--params params.yaml] [--set key=value ...]
    python -m kd.data check data/synthetic/annotations/instances_val.json data/synthetic/val

Bad input prints one line to stderr and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from kd.data.synthetic import SyntheticConfig, generate
from kd.data.validate import validate_coco


def parse_overrides(items: list[str]) -> dict:
    """``["num_train=100", "large_per_image=[0.1, 0.9]"]`` -> dict, values parsed as YAML.

    Keys are relative to ``data.synthetic`` (unknown ones are rejected by ``SyntheticConfig``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_synthetic_config(params: Path, overrides: dict) -> SyntheticConfig:
    """``data.synthetic`` of a params file (read by ``kd.config.load_params``; a missing file means the
    defaults) with ``overrides`` applied."""
    from kd.config import load_params

    values: dict = {}
    if params.is_file():
        values = dict((load_params(params).get("data") or {}).get("synthetic") or {})
    values.update(overrides)
    try:
        return SyntheticConfig.from_dict(values)
    except TypeError as e:  # wrong value types
        raise ValueError(f"{params}: data.synthetic: {e}") from None


def _generate(args: argparse.Namespace) -> None:
    cfg = load_synthetic_config(Path(args.params), parse_overrides(args.set))
    summary = generate(cfg, Path(args.root), workers=args.workers)
    print(json.dumps(summary, indent=1))


def _check(args: argparse.Namespace) -> None:
    mode = {"verify": True, "exists": "exists", "none": False}[args.images]
    data = validate_coco(args.ann_file, args.img_dir, check_images=mode, degenerate=args.degenerate)
    n_img, n_ann, n_cat = (len(data[k]) for k in ("images", "annotations", "categories"))
    print(f"{args.ann_file}: ok ({n_img} images, {n_ann} annotations, {n_cat} categories)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write the synthetic COCO-format dataset")
    gen.add_argument("--root", default="data/synthetic")
    gen.add_argument("--params", default="params.yaml", help="reads data.synthetic (defaults if absent)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    gen.add_argument("--workers", type=int, default=None, help="processes (output does not depend on it)")
    gen.set_defaults(func=_generate)
    chk = sub.add_parser("check", help="validate a COCO instances file and its images")
    chk.add_argument("ann_file")
    chk.add_argument("img_dir")
    chk.add_argument("--images", choices=["verify", "exists", "none"], default="verify")
    chk.add_argument("--degenerate", choices=["error", "skip"], default="error")
    chk.set_defaults(func=_check)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
