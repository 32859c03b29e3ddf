"""Per-iteration time and peak memory of each distiller against plain student training.

Embedded default configuration (params.yaml: student and teacher models, distill.<method>), one process for
the timings with the methods interleaved round by round (ratios stay fair on a noisy machine), and one
short subprocess per method for its peak resident memory. The teacher is randomly initialised: its weights
do not change the cost. Also times the teacher's forward alone (``teacher_forward``: what any distiller adds
at the least; ``floor`` = 1 + its ratio). Also counts each iteration's matrix FLOPs (``gflop``,
``flop_ratio``, ``flop_floor``): the ratios the arithmetic alone sets, however fast the implementation.
Prints a table, then one JSON object with the ratios as its last line.

    python bench/distill_overhead.py [--rounds 5] [--iters 3] [--batch B] [--size S] [--amp auto|none|bf16]
        [--no-share] [--params FILE] [--flops-only]  # defaults: the student's batch and amp, the val size
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from kd.config import ROLES, load_params, loss_config, model_config, train_config
from kd.data.coco import collate_fn
from kd.distill.build import loss_factory
from kd.engine import autocast, build_optimizer, criterion_loss
from kd.models import build_criterion, build_model

METHODS = ("none", "qskd", "kd_detr", "detrdistill")


def fake_batch(batch: int, size: int, num_classes: int, seed: int = 0):
    """A padded batch of random images with 1..8 random boxes each (no disk access)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(batch):
        h, w = size, size - 16 * (i % 2)
        n = int(torch.randint(1, 9, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        target = {
            "boxes": torch.cat([cxcy, wh], 1),
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "image_id": i,
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        items.append((torch.randn(3, h, w, generator=g), target))
    return collate_fn(items)


def backbone_file(params: dict) -> dict:
    """``params`` with the backbone weights files made to exist: the pretrain stage's file when it has run,
    else a random ResNet state dict per missing file in a temporary folder (the cost is the same). Roles
    naming the same file get the same temporary file, so a frozen backbone the pipeline shares between
    teacher and student is shared here too."""
    models = {r: model_config(params, r) for r in ROLES}
    missing = {m["backbone_weights"] for m in models.values()} - {None}
    missing = {f for f in missing if not Path(f).exists()}
    if not missing:
        return params
    folder = Path(tempfile.mkdtemp())
    stand_in = {f: folder / f"backbone{i}.pt" for i, f in enumerate(sorted(missing))}  # file -> stand-in
    roles = {}
    for r, m in models.items():
        path = stand_in.get(m["backbone_weights"])
        if path is None:
            continue
        if not path.exists():
            torch.save(getattr(torchvision.models, m["backbone"])().state_dict(), path)
        roles[r] = {**params[r], "model": {**params[r].get("model", {}), "backbone_weights": str(path)}}
    return {**params, **roles}


def make_step(params: dict, method: str, share: bool = True, amp: str | None = None):
    """A closure running one training iteration (forward, losses, backward, AdamW step) of ``method``.

    As in ``kd.train``: the optimizer and autocast mode (``amp``, unless given) of ``student.train``
    (``lr_backbone: 0`` freezes the backbone; the teacher's forward runs under the same autocast); the
    teacher has random weights but its backbone file (they do not change the cost). ``share=False`` turns
    off the shared frozen backbone (to measure what it saves); a teacher whose backbone trains
    (``teacher.train.lr_backbone`` > 0) never shares it, as in the pipeline, where its weights then differ
    from the student's."""
    torch.manual_seed(0)
    params = {**params, "distill": {**params["distill"], "method": method}}
    student = build_model(model_config(params, "student")).train()
    num_classes = model_config(params, "student")["num_classes"]
    criterion = build_criterion(loss_config(params, "student"), num_classes)
    teacher = build_model(model_config(params, "teacher")).eval()
    factory = loss_factory(params, teacher=teacher)
    loss_fn = factory(student, criterion) if factory else criterion_loss(criterion)
    if factory and (not share or train_config(params, "teacher").lr_backbone != 0):
        loss_fn._shared_backbone = False
    extra = loss_fn if isinstance(loss_fn, torch.nn.Module) else None
    cfg = train_config(params, "student")
    opt = build_optimizer(student, cfg, extra)
    amp = cfg.amp if amp is None else amp

    def step(batch):
        images, mask, targets = batch
        with autocast(torch.device("cpu"), amp):  # the teacher's forward too, as in kd.engine
            losses = loss_fn(student, images, mask, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    step.loss_fn = loss_fn
    return step


def make_teacher_forward(params: dict, amp: str | None = None, share: bool = True):
    """A closure running the teacher's forward alone as a distillation step runs it (``no_grad``, the
    student's autocast), no extra query groups: the least any distiller adds to the student's step, so
    ``1 + its time / the student's step`` bounds every method's ratio from below. With ``share`` (the
    distillation step shares a frozen backbone) the backbone's features are given rather than computed: the
    student's own step computes them."""
    torch.manual_seed(0)
    teacher = build_model(model_config(params, "teacher")).eval().requires_grad_(False)
    amp = train_config(params, "student").amp if amp is None else amp
    last: dict = {}  # the last batch's images and their backbone features

    def forward(batch):
        images, mask, _ = batch
        if share and last.get("images") is not images:  # once per batch, outside the timed forwards
            with torch.no_grad(), autocast(torch.device("cpu"), amp):
                last.update(images=images, features=teacher.backbone(images, mask))
        if share:
            teacher.backbone.give(images, last["features"])
        with torch.no_grad(), autocast(torch.device("cpu"), amp):
            teacher(images, mask)

    return forward


def gflop(step, batch) -> float:
    """GFLOP of one call of ``step`` on ``batch``: the matrix products and convolutions, forward and backward
    (``torch.utils.flop_counter``; deformable attention's bilinear sampling, normalisations and element-wise
    ops are not counted: they are a small part of the arithmetic, a larger part of the time)."""
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops() / 1e9


def peak_memory_mb(method: str, args: argparse.Namespace) -> float:
    """Peak resident memory (MiB) sampled while a fresh process runs 2 iterations of ``method``.

    Sampled (psutil, every 5 ms) during the iterations only: the process-wide ``ru_maxrss`` is dominated by
    importing torch and would hide the difference between methods."""
    code = (
        "import sys, threading, time, psutil; sys.argv=['x']; from bench.distill_overhead import *;"
        f"p=backbone_file(load_params({args.params!r}));"
        f"s=make_step(p,{method!r},share={not args.no_share},amp={args.amp!r});"
        f"b=fake_batch({args.batch},{args.size},model_config(p,'student')['num_classes']); s(b);"
        "proc=psutil.Process(); peak=[0]; done=threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set(): peak[0]=max(peak[0], proc.memory_info().rss); time.sleep(0.005)\n"
        "t=threading.Thread(target=watch); t.start(); s(b); s(b); done.set(); t.join(); print(peak[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="default: student.train.batch_size")
    p.add_argument("--size", type=int, default=None, help="image side; default: data.transforms.val_size")
    p.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto", help="auto: student.train.amp")
    p.add_argument("--no-share", action="store_true", help="compute a shared frozen backbone twice")
    p.add_argument("--params", default="params.yaml", help="params file (e.g. a preset applied to a copy)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs, no timings (large configurations)")
    args = p.parse_args()
    params = backbone_file(load_params(args.params))
    args.batch = args.batch or train_config(params, "student").batch_size
    args.size = args.size or params["data"]["transforms"]["val_size"]
    args.amp = train_config(params, "student").amp if args.amp == "auto" else args.amp
    batch = fake_batch(args.batch, args.size, model_config(params, "student")["num_classes"])
    steps = {m: make_step(params, m, share=not args.no_share, amp=args.amp) for m in METHODS}
    for step in steps.values():  # warm-up; the first distillation step decides whether the backbone is shared
        step(batch)
    shared = bool(steps["qskd"].loss_fn._shared_backbone)
    steps["teacher_forward"] = make_teacher_forward(params, amp=args.amp, share=shared)
    steps["teacher_forward"](batch)
    flops = {m: gflop(step, batch) for m, step in steps.items()}
    base_f = flops["none"]
    flop_entry = {m: {"gflop": round(f, 3), "flop_ratio": round(f / base_f, 3)} for m, f in flops.items()}
    flop_floor = 1 + flops["teacher_forward"] / base_f
    result = {"threads": torch.get_num_threads(), "batch": args.batch, "size": args.size, "amp": args.amp,
              "shared_backbone": shared}  # fmt: skip
    if args.flops_only:
        print(f"{'method':<16} {'GFLOP':>8} {'ratio':>6}")
        for m, f in flops.items():
            print(f"{m:<16} {f:8.2f} {f / base_f:6.2f}")
        print(f"no method's ratio can be below {flop_floor:.2f} (FLOPs)")
        print(json.dumps({**result, **flop_entry, "flop_floor": round(flop_floor, 3)}))
        return
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.rounds):
        for m, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.iters):
                step(batch)
            times[m].append((time.perf_counter() - t) / args.iters)
    memory = {m: peak_memory_mb(m, args) for m in METHODS}
    base_t, base_m = statistics.median(times["none"]), memory["none"]
    print(f"{'method':<12} {'s/iter':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} {'GFLOP':>7} {'ratio':>6}")
    for m in steps:
        t, f = statistics.median(times[m]), flops[m]
        result[m] = {"s_per_iter": round(t, 4), "time_ratio": round(t / base_t, 3)}
        mem_cols = f"{'':>16}"  # the teacher's forward alone: no memory sample
        if m in memory:
            result[m]["mem_ratio"] = round(memory[m] / base_m, 3)
            mem_cols = f"{memory[m]:9.0f} {memory[m] / base_m:6.2f}"
        label = "teacher fwd" if m == "teacher_forward" else m
        print(f"{label:<12} {t:8.3f} {t / base_t:6.2f} {mem_cols} {f:7.2f} {f / base_f:6.2f}")
        result[m].update(flop_entry[m])
    floor = 1 + statistics.median(times["teacher_forward"]) / base_t
    print(f"no method's ratio can be below {floor:.2f} (time) / {flop_floor:.2f} (FLOPs)")
    result["floor"] = round(floor, 3)
    result["flop_floor"] = round(flop_floor, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
