"""Per-iteration time and peak memory of each distiller against plain student training.

Embedded default configuration (params.yaml: student and teacher models, distill.<method>), one process for
the timings with the methods interleaved round by round (ratios stay fair on a noisy machine), and one
short subprocess per method for its peak resident memory. The teacher is randomly initialised: its weights
do not change the cost. Also times the teacher's forward alone (``teacher_forward``: what any distiller adds
at the least; ``floor`` = 1 + its ratio). Prints a table, then one JSON object with the ratios as its last
line.

    python bench/distill_overhead.py [--rounds 5] [--iters 3] [--batch B] [--size S] [--amp auto|none|bf16]
        [--no-share] [--params FILE]     # defaults: the student's batch and amp, the validation size
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
    """``params`` with the backbone weights file made to exist: the pretrain stage's file when it has run,
    else a random ResNet state dict in a temporary file (the cost is the same; teacher and student load the
    same file either way, as in the pipeline, so a shared frozen backbone is shared here too)."""
    files = {model_config(params, r)["backbone_weights"] for r in ("teacher", "student")} - {None}
    missing = sorted(f for f in files if not Path(f).exists())
    if not missing:
        return params
    path = Path(tempfile.mkdtemp()) / "backbone.pt"
    torch.save(getattr(torchvision.models, model_config(params, "student")["backbone"])().state_dict(), path)
    roles = {r: {**params[r], "model": {**params[r]["model"], "backbone_weights": str(path)}} for r in ROLES}
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

    return step


def make_teacher_forward(params: dict, amp: str | None = None):
    """A closure running the teacher's forward alone as a distillation step runs it (``no_grad``, the
    student's autocast), its frozen backbone's features given rather than computed (the step shares them
    with the student, whose own step computes them too), no extra query groups: the least any distiller adds
    to the student's step, so ``1 + its time / the student's step`` bounds every method's ratio from below."""
    torch.manual_seed(0)
    teacher = build_model(model_config(params, "teacher")).eval().requires_grad_(False)
    amp = train_config(params, "student").amp if amp is None else amp
    last: dict = {}  # the last batch's images and their backbone features

    def forward(batch):
        images, mask, _ = batch
        if last.get("images") is not images:  # once per batch, outside the timed forwards that follow
            with torch.no_grad(), autocast(torch.device("cpu"), amp):
                last.update(images=images, features=teacher.backbone(images, mask))
        teacher.backbone.give(images, last["features"])
        with torch.no_grad(), autocast(torch.device("cpu"), amp):
            teacher(images, mask)

    return forward


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
    args = p.parse_args()
    params = backbone_file(load_params(args.params))
    args.batch = args.batch or train_config(params, "student").batch_size
    args.size = args.size or params["data"]["transforms"]["val_size"]
    args.amp = train_config(params, "student").amp if args.amp == "auto" else args.amp
    batch = fake_batch(args.batch, args.size, model_config(params, "student")["num_classes"])
    steps = {m: make_step(params, m, share=not args.no_share, amp=args.amp) for m in METHODS}
    steps["teacher_forward"] = make_teacher_forward(params, amp=args.amp)
    for step in steps.values():  # warm-up
        step(batch)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.rounds):
        for m, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.iters):
                step(batch)
            times[m].append((time.perf_counter() - t) / args.iters)
    memory = {m: peak_memory_mb(m, args) for m in METHODS}
    base_t, base_m = statistics.median(times["none"]), memory["none"]
    print(f"{'method':<12} {'s/iter':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}")
    result = {"threads": torch.get_num_threads(), "batch": args.batch, "size": args.size, "amp": args.amp,
              "shared_backbone": not args.no_share}  # fmt: skip
    for m in METHODS:
        t = statistics.median(times[m])
        print(f"{m:<12} {t:8.3f} {t / base_t:6.2f} {memory[m]:9.0f} {memory[m] / base_m:6.2f}")
        result[m] = {
            "s_per_iter": round(t, 4),
            "time_ratio": round(t / base_t, 3),
            "mem_ratio": round(memory[m] / base_m, 3),
        }
    t = statistics.median(times["teacher_forward"])
    floor = 1 + t / base_t
    print(f"{'teacher fwd':<12} {t:8.3f} {t / base_t:6.2f}   (no method's ratio can be below {floor:.2f})")
    result["teacher_forward"] = {"s_per_iter": round(t, 4), "time_ratio": round(t / base_t, 3)}
    result["floor"] = round(floor, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
