"""Deformable attention without gradients: kd's gather path against the official ``grid_sample`` path.

``kd.ops.msdeform_attn`` takes one weighted gather (``F.embedding_bag``) when no gradient is needed on the
CPU (a teacher inside distillation, evaluation, prediction) and the official per-level ``grid_sample``
calls otherwise; ``kd.ops.use_gather(False)`` turns the gather off. This times, interleaved round by round
in one process:

* the sampling kernel alone (``ms_deform_attn_gather`` / ``ms_deform_attn_grid_sample``) at the default
  teacher's encoder (every memory token a query) and decoder (its queries) sizes, validation-sized images;
* the default teacher's and student's whole forward (params.yaml, ``no_grad``, the student's autocast as
  distillation runs the teacher; random weights, a fixed random batch) with the gather on and off;
* one distillation step of each method (``bench/distill_overhead.py``'s closures) with the gather on
  and off: what the speed-up is worth where it was made for.

Ratios are official / gather time (> 1: the gather path is faster). Last line: one JSON object.

    python bench/msdeform_attn.py [--threads 1] [--rounds 5] [--iters 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.distill_overhead import backbone_file, fake_batch, make_step  # noqa: E402
from kd.config import load_params, model_config, train_config  # noqa: E402
from kd.engine import autocast  # noqa: E402
from kd.models import build_model  # noqa: E402
from kd.ops import ms_deform_attn_gather, ms_deform_attn_grid_sample, use_gather  # noqa: E402


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed round by round after one warm-up call each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(v) for name, v in times.items()}


def kernel_inputs(params: dict, n_q: int, batch: int, size: int, seed: int = 0):
    """Random (value, spatial_shapes, locations, weights) at the teacher's levels for ``n_q`` queries."""
    cfg = model_config(params, "teacher")
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[-(-size // s), -(-size // s)] for s in cfg["strides"]])
    heads, points, d_head = cfg["nheads"], cfg["enc_points"], cfg["hidden_dim"] // cfg["nheads"]
    s = int(shapes.prod(1).sum())
    value = torch.randn(batch, s, heads, d_head, generator=g)
    locations = torch.rand(batch, n_q, heads, len(shapes), points, 2, generator=g) * 1.1 - 0.05
    weights = torch.rand(batch, n_q, heads, len(shapes), points, generator=g).softmax(-1)
    return value, shapes, locations, weights


def forward_closure(params: dict, role: str, batch, amp: str) -> Callable[[], None]:
    """``role``'s whole forward on ``batch`` under ``no_grad`` and ``amp`` (random weights)."""
    torch.manual_seed(0)
    model = build_model(model_config(params, role)).eval()
    images, mask, _ = batch

    def forward() -> None:
        with torch.no_grad(), autocast(torch.device("cpu"), amp):
            model(images, mask)

    return forward


def switched(fn: Callable, enabled: bool) -> Callable[[], None]:
    """``fn`` run with the gather path on or off."""

    def run(*args) -> None:
        with use_gather(enabled):
            fn(*args)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = backbone_file(load_params(args.params))
    bsz, size = train_config(params, "student").batch_size, params["data"]["transforms"]["val_size"]
    amp = train_config(params, "student").amp
    result: dict = {"threads": args.threads, "batch": bsz, "size": size, "amp": amp}
    print(f"{'what':<34} {'official':>10} {'gather':>10} {'ratio':>6}")

    def record(key: str, t: dict[str, float], unit: float = 1e3, label: str = "ms") -> None:
        ratio = t["official"] / t["gather"]
        result[key] = {
            "official": round(t["official"], 5),
            "gather": round(t["gather"], 5),
            "ratio": round(ratio, 3),
        }
        print(
            f"{key:<34} {t['official'] * unit:8.2f}{label} {t['gather'] * unit:8.2f}{label} {ratio:6.2f}",
            flush=True,
        )

    _, shapes, _, _ = kernel_inputs(params, 1, bsz, size)
    n_dec = model_config(params, "teacher")["num_queries"]
    for name, n_q in (("kernel_encoder", int(shapes.prod(1).sum())), ("kernel_decoder", n_dec)):
        inputs = kernel_inputs(params, n_q, bsz, size)
        t = interleaved(
            {"official": lambda i=inputs: ms_deform_attn_grid_sample(*i),
             "gather": lambda i=inputs: ms_deform_attn_gather(*i)},
            args.rounds, 10,
        )  # fmt: skip
        record(name, t)
    batch = fake_batch(bsz, size, model_config(params, "student")["num_classes"])
    for role in ("teacher", "student"):
        fwd = forward_closure(params, role, batch, amp)
        t = interleaved(
            {"official": switched(fwd, False), "gather": switched(fwd, True)}, args.rounds, args.iters
        )
        record(f"{role}_forward", t)
    for method in ("none", "qskd", "kd_detr", "detrdistill"):
        step = make_step(params, method, amp=amp)
        variants = {
            "official": lambda s=step: switched(s, False)(batch),
            "gather": lambda s=step: switched(s, True)(batch),
        }
        record(f"step_{method}", interleaved(variants, args.rounds, args.iters))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
