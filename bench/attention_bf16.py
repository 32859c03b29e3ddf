"""Attention products under CPU bf16 autocast: in bf16 (autocast's choice) against fp32 (kd's, ``sdpa``).

Autocast lists ``scaled_dot_product_attention`` among its bf16 ops, and torch's CPU flash-attention kernel is
several times slower in bf16 than in fp32 at DETR's sizes. ``kd.models.transformer_layers.sdpa`` therefore
runs the attention products in fp32 with autocast off (the projections around them stay bf16). This times:

* the SDPA kernel alone (forward + backward) at the shapes the default detectors use, bf16 against fp32;
* one training step of the embedded default's teacher and student (params.yaml, under their ``amp``) with
  ``sdpa`` as kd has it against ``sdpa`` handing bf16 to the kernel (what a plain SDPA call under autocast
  does), interleaved round by round in one process on one fixed random batch.

Ratios are bf16 time / fp32 time (> 1: kd's fp32 attention is faster). Last line: one JSON object.

    python bench/attention_bf16.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.amp_speed import make_step  # noqa: E402
from bench.distill_overhead import backbone_file, fake_batch  # noqa: E402
from kd.config import load_params, model_config, train_config  # noqa: E402
from kd.models import transformer_layers  # noqa: E402

# (batch, heads, queries, keys, channels per head): decoder self-attention of the student (50 queries) and
# of the teacher with denoising groups (~150 queries); DAB/Conditional cross-attention (2 x 64 / 8 heads)
SHAPES = [(4, 8, 50, 50, 8), (4, 8, 150, 150, 16), (16, 8, 50, 50, 8), (16, 8, 50, 30, 16)]
KD_SDPA = transformer_layers.sdpa


def bf16_sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
    """SDPA as autocast runs it: the kernel in bf16."""
    return F.scaled_dot_product_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=attn_mask, dropout_p=dropout_p
    ).to(q.dtype)


def kernel_times(shape: tuple[int, ...], rounds: int, iters: int = 10) -> dict[str, float]:
    """Median ms of SDPA forward + backward at ``shape`` in bf16 and in fp32."""
    b, h, lq, s, d = shape
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (lq, s, s))
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}

    def run(dtype: torch.dtype) -> None:
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        out.float().sum().backward()

    for dtype in (torch.bfloat16, torch.float32):
        run(dtype)
    for _ in range(rounds):
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            t0 = time.perf_counter()
            for _ in range(iters):
                run(dtype)
            times[name].append((time.perf_counter() - t0) / iters * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def step_times(params: dict, role: str, rounds: int, iters: int) -> dict[str, float]:
    """Median s/step of ``role``'s training step with kd's fp32 attention and with bf16 attention."""
    amp = train_config(params, role).amp
    step = make_step(params, role)
    batch = fake_batch(train_config(params, role).batch_size, 160, model_config(params, role)["num_classes"])
    variants = {"bf16": bf16_sdpa, "fp32": KD_SDPA}
    for fn in variants.values():  # warm-up
        transformer_layers.sdpa = fn
        step(batch, amp)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            transformer_layers.sdpa = fn
            t0 = time.perf_counter()
            for _ in range(iters):
                step(batch, amp)
            times[name].append((time.perf_counter() - t0) / iters)
    transformer_layers.sdpa = KD_SDPA
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="training steps per timed round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "kernel_bf16_over_fp32": {}, "step_bf16_over_fp32": {}}
    for shape in SHAPES:
        t = kernel_times(shape, args.rounds)
        result["kernel_bf16_over_fp32"][str(shape)] = round(t["bf16"] / t["fp32"], 3)
        print(f"SDPA fwd+bwd {shape}: bf16 {t['bf16']:.2f} ms, fp32 {t['fp32']:.2f} ms", flush=True)
    params = backbone_file(load_params(args.params))
    for role in ("teacher", "student"):
        if train_config(params, role).amp != "bf16":
            print(f"{role}: amp is {train_config(params, role).amp!r}, not bf16; skipped")
            continue
        t = step_times(params, role, args.rounds, args.iters)
        result["step_bf16_over_fp32"][role] = round(t["bf16"] / t["fp32"], 3)
        print(f"{role} step: bf16 attention {t['bf16']:.3f} s, fp32 (kd) {t['fp32']:.3f} s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
