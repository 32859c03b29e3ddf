"""Training-step time with and without kd's glibc allocator settings (``kd/runtime.py``).

The setting is process-wide (``mallopt`` at ``import kd``), so this benchmark alternates child processes
with ``KD_TUNE_MALLOC=0`` and ``=1`` (A, B, B, A, ... so drift hits both alike). Each child runs the
embedded default's teacher (strides 16/32, and 8/16/32), student, and a QSKD distillation step (params.yaml,
frozen backbone as in training, random weights: they do not change the cost) on one fixed batch, and reports
its median step times. The parent prints per model the median over children of each setting and the ratio
off / on (> 1: the settings make training faster); the last line is one JSON object.

    python bench/allocator.py [--pairs 3] [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(steps: int, threads: int) -> dict[str, float]:
    """Median seconds per step of each model in this process (kd imported with the environment's setting)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.amp_speed import make_step
    from bench.distill_overhead import backbone_file, fake_batch
    from bench.distill_overhead import make_step as make_distill_step
    from kd.config import load_params
    from kd.runtime import malloc_tuned

    torch.set_num_threads(threads)
    params = backbone_file(load_params(ROOT / "params.yaml", []))
    fine = copy.deepcopy(params)
    fine["model"]["strides"] = [8, 16, 32]
    runs = {
        "teacher_s16": make_step(params, "teacher"),
        "teacher_s8": make_step(fine, "teacher"),
        "student": make_step(params, "student"),
    }
    distill = make_distill_step(params, "qskd")
    batch = fake_batch(4, 144, params["model"]["num_classes"])
    times: dict[str, list[float]] = {k: [] for k in [*runs, "qskd"]}
    for i in range(steps + 1):  # the first round warms up
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(batch, "none")
            if i:
                times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        distill(batch)
        if i:
            times["qskd"].append(time.perf_counter() - t)
    return {"tuned": malloc_tuned(), **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="child processes per setting")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model and child")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.threads)))
        return
    results: dict[str, list[dict]] = {"0": [], "1": []}
    for i in range(args.pairs):
        for setting in ("0", "1") if i % 2 == 0 else ("1", "0"):
            env = {**os.environ, "KD_TUNE_MALLOC": setting}
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[setting].append(json.loads(out.strip().splitlines()[-1]))
    if any(r["tuned"] for r in results["0"]) or not all(r["tuned"] for r in results["1"]):
        raise SystemExit("allocator: KD_TUNE_MALLOC did not switch the setting (not glibc?)")
    names = [k for k in results["0"][0] if k != "tuned"]
    print(f"{'model':<12} {'off s/step':>10} {'on s/step':>10} {'off/on':>7}")
    ratios = {}
    for name in names:
        off = statistics.median(r[name] for r in results["0"])
        on = statistics.median(r[name] for r in results["1"])
        ratios[name] = round(off / on, 3)
        print(f"{name:<12} {off:>10.4f} {on:>10.4f} {ratios[name]:>7.3f}")
    print(json.dumps({"untuned_over_tuned": ratios, "pairs": args.pairs, "threads": args.threads}))


if __name__ == "__main__":
    main()
