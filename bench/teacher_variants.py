"""Training-step time of teacher variants against the default teacher, interleaved in one process.

What a bigger or fine-tuned teacher costs per step decides whether it fits the pipeline's teacher budget
(README "Convergence"). Each variant is params.yaml with ``--set``-style overrides (the same keys as
``python -m kd.train --set``); every variant's step is built once and the variants are timed round by round
on one fixed random batch (random weights except the backbone file: weights do not change the cost). The
last line is one JSON object: per variant the median s/step and its ratio to ``default``.

    python bench/teacher_variants.py [--threads 1] [--rounds 5] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.amp_speed import make_step  # noqa: E402
from bench.distill_overhead import backbone_file, fake_batch  # noqa: E402
from kd.config import load_params  # noqa: E402

FT = "teacher.train.lr_backbone=5e-5"  # fine-tuned backbone: layer2-4 train (backbone_trainable_layers null)
VFL = "teacher.loss.cls_loss=varifocal"  # IoU-aware classification (RT-DETR)
O2M = "teacher.model.one2many_queries=150"  # H-DETR hybrid matching: 150 one-to-many proposals
VARIANTS = {
    "default": [],
    "dec_layers 6": ["teacher.model.dec_layers=6"],
    "enc_layers 4": ["teacher.model.enc_layers=4"],
    "hidden 256": ["teacher.model.hidden_dim=256", "teacher.model.ffn_dim=1024"],
    "fine-tuned all 5 stages": [FT, "teacher.model.backbone_trainable_layers=5"],
    "fine-tuned layer2-4": [FT],
    "fine-tuned layer3-4": [FT, "teacher.model.backbone_trainable_layers=2"],
    "fine-tuned + dec_layers 6": [FT, "teacher.model.dec_layers=6"],
    "fine-tuned + dec 6, bf16": [FT, "teacher.model.dec_layers=6", "teacher.train.amp=bf16"],
    "100 queries": ["teacher.model.num_queries=100"],
    "varifocal": [VFL],
    "one-to-many 150": [O2M],
    "varifocal + one-to-many 150": [VFL, O2M],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=144)
    p.add_argument("--only", nargs="+", metavar="NAME", help="time these variants (and default) only")
    args = p.parse_args()
    unknown = sorted(set(args.only or ()) - set(VARIANTS))
    if unknown:
        p.error(f"--only: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    torch.set_num_threads(args.threads)
    steps, amp = {}, {}
    for name, overrides in VARIANTS.items():
        if args.only and name != "default" and name not in args.only:
            continue
        params = backbone_file(load_params(args.params, overrides))
        steps[name] = make_step(params, "teacher")
        amp[name] = params["teacher"]["train"].get("amp", "none")
    batch = fake_batch(args.batch, args.size, params["model"]["num_classes"])
    for name, step in steps.items():  # warm-up
        step(batch, amp[name])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(batch, amp[name])
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, m in med.items():
        print(f"{name:28s} {m:.3f} s/step  {m / med['default']:.2f}x", flush=True)
    print(json.dumps({name: [round(m, 3), round(m / med["default"], 2)] for name, m in med.items()}))


if __name__ == "__main__":
    main()
