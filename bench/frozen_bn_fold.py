"""Frozen batch norm folded into the convolutions (kd's default) against the unfolded fused ``F.batch_norm``.

The Deformable DETR of ``bench/detector_speed.py`` (the embedded default student, every parameter trained,
frozen batch norm, batch 16 of ~160x192 images) trains with its backbone as kd builds it (each frozen batch
norm folded into the convolution before it: ``kd.models.backbone.fold_frozen_batch_norms``) and with the
fold undone, in one process, rounds interleaved in alternating order. The outputs are compared first.

Prints a table and, as its last line, one JSON object: the median over rounds of unfolded time / folded
time (> 1: the fold is faster) for a training step and for inference.

Usage: ``python bench/frozen_bn_fold.py [--rounds 7] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.detector_speed as ds  # noqa: E402
from kd.config import load_params, model_config  # noqa: E402
from kd.models import build_criterion  # noqa: E402
from kd.models.backbone import unfold_frozen_batch_norms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(Path(__file__).parents[1] / "params.yaml"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = model_config(load_params(args.params), "student")
    cfg = {**base, "backbone_norm": "frozen_bn", "backbone_weights": None, "dn_groups": 0}
    cfg["arch"] = "deformable_detr"
    folded, _ = ds.make_pair(cfg, "deformable_detr")
    plain = copy.deepcopy(folded)
    unfold_frozen_batch_norms(plain)
    batch = ds.make_batch(16, 160, cfg["num_classes"])
    with torch.no_grad():
        diff = (folded.eval()(*batch[:2]).boxes - plain.eval()(*batch[:2]).boxes).abs().max().item()
    criterion = build_criterion({}, cfg["num_classes"])
    runners = {
        "folded": ds.Runner("kd", folded, criterion, batch),
        "plain": ds.Runner("kd", plain, criterion, batch),
    }
    for r in runners.values():
        r.train_step()
        r.infer()
    times = {(k, m): [] for k in runners for m in ("train", "infer")}
    for i in range(args.rounds):
        for k in list(runners) if i % 2 == 0 else list(runners)[::-1]:
            for m, fn in (("train", runners[k].train_step), ("infer", runners[k].infer)):
                start = time.perf_counter()
                fn()
                times[k, m].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, {args.rounds} rounds; max |boxes diff| {diff:.1e}")
    ratios = {}
    for m in ("train", "infer"):
        ratios[m] = round(
            statistics.median(p / f for p, f in zip(times["plain", m], times["folded", m], strict=True)), 3
        )
        print(
            f"{m:5}  folded {statistics.median(times['folded', m]):.3f} s  "
            f"unfolded {statistics.median(times['plain', m]):.3f} s  ratio {ratios[m]:.2f}"
        )
    print(json.dumps({"unfolded_time_over_folded_time": ratios}))


if __name__ == "__main__":
    main()
