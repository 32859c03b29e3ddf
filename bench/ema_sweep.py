"""What an EMA of the weights buys, for several decays in one training run.

    OMP_NUM_THREADS=1 python bench/ema_sweep.py teacher --decays 0.99 0.995 0.998 --out /tmp/ema_t.tsv
    python bench/ema_sweep.py student --decays 0.98 0.99 --set distill.method=kd_detr seed=1

Trains ``role`` exactly as ``python -m kd.train`` would (same seeds, model, loss or distiller, optimizer,
schedule, ``kd.engine.train_one_epoch``) while keeping one :class:`kd.ema.ModelEMA` per decay (all with
``<role>.train.ema_tau``), and after every epoch evaluates the raw weights and each average on the
validation split. The EMAs never feed back into training, so every column of a row comes from the same
trajectory: the comparison carries none of the run-to-run noise of separate runs. One row per epoch and
model goes to ``--out`` (TSV) and to stdout.
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
from kd.ema import ModelEMA  # noqa: E402
from kd.engine import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    criterion_loss,
    evaluate,
    seed_everything,
    set_epoch,
    train_one_epoch,
)
from kd.evaluation import CocoEvaluator  # noqa: E402
from kd.models import build_criterion, build_model  # noqa: E402
from kd.models.postprocess import PostProcess  # noqa: E402
from kd.train import _loaders  # noqa: E402

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class _EMAs:
    """Several averages updated together (``train_one_epoch`` calls ``update`` after each step)."""

    def __init__(self, model: torch.nn.Module, decays: list[float], tau: float) -> None:
        self.emas = {d: ModelEMA(model, d, tau) for d in decays}

    def update(self, model: torch.nn.Module) -> None:
        for ema in self.emas.values():
            ema.update(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", choices=("teacher", "student"))
    p.add_argument("--decays", type=float, nargs="+", required=True)
    p.add_argument("--out", type=Path, default=None, help="TSV of epoch, model, step, COCO metrics")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides")
    args = p.parse_args()

    params = load_params(args.params, args.set)
    validate(params)
    cfg, mcfg = train_config(params, args.role), model_config(params, args.role)
    info = D.init_distributed("cpu")
    cpu = info.device
    seed_everything(cfg.seed, deterministic=True)
    model = build_model(mcfg)
    criterion = build_criterion(loss_config(params, args.role), mcfg["num_classes"])
    postprocess = PostProcess(num_select=min(100, mcfg["num_queries"] * mcfg["num_classes"]))
    train_loader, val_loader, val_set = _loaders(params, cfg, info, with_train=True)
    seed_everything(cfg.seed, deterministic=True)  # as kd.train.run, before the loss is built
    factory = None
    if args.role == "student":
        from kd.distill.build import loss_factory

        factory = loss_factory(params)
    loss_fn = factory(model, criterion) if factory else criterion_loss(criterion)
    extra = loss_fn if isinstance(loss_fn, torch.nn.Module) else None
    optimizer = build_optimizer(model, cfg, extra)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    emas = _EMAs(model, args.decays, cfg.ema_tau)

    rows: list[dict] = []
    step = 0
    for epoch in range(cfg.epochs):
        set_epoch(train_loader, cfg.seed, epoch)
        t0 = time.perf_counter()
        _, step = train_one_epoch(
            model, loss_fn, train_loader, optimizer, scheduler, device=cpu, epoch=epoch, step=step,
            clip_max_norm=cfg.clip_max_norm, amp=cfg.amp, log_every=0, ema=emas,  # type: ignore[arg-type]
        )  # fmt: skip
        took = time.perf_counter() - t0
        for name, net in [("raw", model), *((f"ema{d:g}", e.module) for d, e in emas.emas.items())]:
            evaluator = CocoEvaluator(val_set.coco, val_set.label_to_cat_id)
            m = evaluate(net, val_loader, postprocess, evaluator, device=cpu, amp=cfg.amp)
            rows.append({"epoch": epoch, "model": name, "step": step, **{k: m[k] for k in COLUMNS}})
            cells = " ".join(f"{k} {m[k]:.1f}" for k in COLUMNS)
            print(f"epoch {epoch} step {step} ({took:.0f}s) {name}: {cells}", flush=True)
    if args.out is not None:
        header = ["epoch", "model", "step", *COLUMNS]
        lines = ["\t".join(header)] + ["\t".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                                  for k in header) for r in rows]  # fmt: skip
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
