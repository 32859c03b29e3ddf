"""Training-step time with and without bf16 autocast on the CPU, for the teacher and the student.

Whether ``amp: bf16`` pays on a CPU depends on its instructions (AVX-512 BF16 / AMX) and on the matrix
sizes. This runs the embedded default's teacher and student (params.yaml, frozen backbone as in training,
random weights: they do not change the cost) on one fixed batch, with fp32 and bf16 steps interleaved round
by round in one process, and prints the median step times and the ratio fp32 / bf16 (> 1: bf16 is faster).

    python bench/amp_speed.py [--threads 2] [--rounds 6] [--batch 4] [--size 144]
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

from bench.distill_overhead import backbone_file, fake_batch  # noqa: E402
from kd.config import load_params, loss_config, model_config, train_config  # noqa: E402
from kd.engine import autocast, build_optimizer, criterion_loss  # noqa: E402
from kd.models import build_criterion, build_model  # noqa: E402
from kd.runtime import cpu_bf16_flags  # noqa: E402

MODES = ("none", "bf16")


def make_step(params: dict, role: str):
    """A closure running one training step of ``role`` under the given amp mode."""
    torch.manual_seed(0)
    mcfg = model_config(params, role)
    model = build_model(mcfg).train()
    loss_fn = criterion_loss(build_criterion(loss_config(params, role), mcfg["num_classes"]))
    optimizer = build_optimizer(model, train_config(params, role))
    cpu = torch.device("cpu")

    def step(batch, amp: str) -> None:
        images, mask, targets = batch
        with autocast(cpu, amp):
            losses = loss_fn(model, images, mask, targets)
        optimizer.zero_grad(set_to_none=True)
        torch.stack([v.float() for v in losses.values()]).sum().backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=3, help="steps per timed round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=144)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = backbone_file(load_params(args.params))
    result = {"cpu_flags": cpu_bf16_flags(), "threads": args.threads}
    for role in ("teacher", "student"):
        step = make_step(params, role)
        batch = fake_batch(args.batch, args.size, model_config(params, role)["num_classes"])
        for amp in MODES:  # warm-up
            step(batch, amp)
        times: dict[str, list[float]] = {amp: [] for amp in MODES}
        for _ in range(args.rounds):
            for amp in MODES:
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step(batch, amp)
                times[amp].append((time.perf_counter() - t0) / args.iters)
        med = {amp: statistics.median(v) for amp, v in times.items()}
        print(f"{role}: fp32 {med['none']:.3f} s/step, bf16 {med['bf16']:.3f} s/step", flush=True)
        result[f"{role}_fp32_over_bf16"] = round(med["none"] / med["bf16"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
