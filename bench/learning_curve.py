"""Learning curve of one role for a fixed training-time budget: validation AP every N steps.

The tool behind the convergence figures in the README (what each change to the embedded default bought):

    OMP_NUM_THREADS=1 python bench/learning_curve.py teacher --minutes 12 --every 400 \
        --set data.root=/tmp/syn teacher.train.batch_size=4 "model.strides=[16,32]"

Only the optimizer steps count towards the budget (data loading and evaluation are excluded and printed
separately), so runs sharing the machine compare by steps, and by s/step side by side. It uses the same
model, criterion, optimizer, schedule and evaluator as ``python -m kd.train``, without checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd import distributed as D  # noqa: E402
from kd.config import load_params, loss_config, model_config, train_config, validate  # noqa: E402
from kd.engine import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    criterion_loss,
    evaluate,
    seed_everything,
    to_device,
)
from kd.evaluation import CocoEvaluator  # noqa: E402
from kd.models import build_criterion, build_model  # noqa: E402
from kd.models.postprocess import PostProcess  # noqa: E402
from kd.train import _loaders  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", choices=("teacher", "student"))
    p.add_argument("--minutes", type=float, default=10.0, help="budget of optimizer-step time")
    p.add_argument("--every", type=int, default=400, help="evaluate every this many steps")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides")
    args = p.parse_args()

    params = load_params(args.params, args.set)
    validate(params)
    cfg, mcfg = train_config(params, args.role), model_config(params, args.role)
    info = D.init_distributed("cpu")
    seed_everything(cfg.seed, deterministic=False)
    model = build_model(mcfg)
    criterion = build_criterion(loss_config(params, args.role), mcfg["num_classes"])
    postprocess = PostProcess(num_select=min(100, mcfg["num_queries"] * mcfg["num_classes"]))
    train_loader, val_loader, val_set = _loaders(params, cfg, info, with_train=True)
    loss_fn = criterion_loss(criterion)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    cpu = torch.device("cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.role}: {trainable} trainable parameters, {len(train_loader)} steps per epoch", flush=True)

    spent, step, epoch = 0.0, 0, 0
    while True:
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            t0 = time.perf_counter()
            images, mask, targets = to_device(batch, cpu)
            loss = sum(loss_fn(model, images, mask, targets).values())
            optimizer.zero_grad()
            loss.backward()
            if cfg.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            spent += time.perf_counter() - t0
            if step % 25 == 0:
                rate = spent / step
                print(f"step {step} {spent:.0f}s loss {loss.item():.3f} {rate:.2f} s/step", flush=True)
            last = spent > args.minutes * 60
            if step % args.every == 0 or last:
                t1 = time.perf_counter()
                evaluator = CocoEvaluator(val_set.coco, val_set.label_to_cat_id)
                m = evaluate(model, val_loader, postprocess, evaluator, device=cpu)
                shown = " ".join(f"{k} {m[k]:.1f}" for k in ("AP", "AP50", "APs", "APm", "APl"))
                took = time.perf_counter() - t1
                line = f"EVAL step {step} epoch {epoch} train {spent:.0f}s {shown} (eval {took:.0f}s)"
                print(line, flush=True)
                if last:
                    return
        epoch += 1


if __name__ == "__main__":
    main()
