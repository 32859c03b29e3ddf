"""``python -m kd.train``: train (or evaluate) the teacher or the student detector described by params.yaml.

    python -m kd.train --role teacher --params params.yaml --out models/teacher [--set teacher.train.epochs=2]
    python -m kd.train --role teacher --out models/teacher --eval-only [--checkpoint models/teacher/best.pt]
    torchrun --nproc_per_node=2 -m kd.train --role student --out models/student   # DDP, unchanged

Writes ``<out>/last.pt``, ``best.pt``, ``metrics.json`` and ``plots/{train,val}.tsv`` and resumes from
``<out>/last.pt`` when present and written with the same :func:`run_settings` (other settings: an error, or
with ``--restart`` that run is deleted and training starts from scratch). Notebooks call :func:`run`, the
same function the command line calls. Bad input prints ``error: <one line>`` and exits with status 2 (bad
params, nothing written) or 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from kd import distributed as D
from kd.checkpoint import load_checkpoint, load_model_state
from kd.config import ROLES, TrainConfig, load_params, loss_config, model_config, train_config, validate
from kd.engine import (
    EpochSampler,
    LossFn,
    ShardSampler,
    build_optimizer,
    build_scheduler,
    criterion_loss,
    evaluate,
    fit,
    seed_everything,
)
from kd.io import write_json_atomic

log = logging.getLogger("kd.train")

LossFactory = Callable[[nn.Module, nn.Module], LossFn]


def run(
    params: dict,
    role: str,
    out_dir: str | Path,
    *,
    max_iters: int | None = None,
    eval_only: bool = False,
    checkpoint: str | Path | None = None,
    metrics_path: str | Path | None = None,
    device: str | None = None,
    loss_factory: LossFactory | None = None,
    on_change: str = "error",
) -> dict:
    """Train ``role`` (teacher | student) as ``params`` describes, or only evaluate a checkpoint.

    Args:
        max_iters: cap on iterations per epoch, and on evaluation batches (smoke runs).
        eval_only: evaluate ``checkpoint`` (default ``out_dir/best.pt``, else ``last.pt``) and write the
            metrics to ``metrics_path`` (default ``out_dir/eval.json``).
        device: "cpu" | "cuda" | None (CUDA when available).
        loss_factory: ``(model, criterion) -> loss_fn`` replacing the plain detection loss; a loss_fn that
            is an ``nn.Module`` has its trainable parameters optimised and checkpointed. Default for the
            student: ``distill.method`` of ``params`` (:mod:`kd.distill.build`), the plain loss when none.
        on_change: what a ``<out_dir>/last.pt`` written with other :func:`run_settings` does: "error"
            (refuse, the command line's default) or "restart" (delete that run and train from scratch: the
            notebooks, so that ``dvc repro`` after a parameter change retrains instead of resuming).

    Returns the metrics summary (training) or the evaluation metrics.
    """
    validate(params)
    cfg, mcfg = train_config(params, role), model_config(params, role)
    out_dir = Path(out_dir)
    info = D.init_distributed(device)
    if cfg.batch_size % info.world_size:
        raise ValueError(
            f"{role}.train.batch_size {cfg.batch_size} is not divisible by {info.world_size} processes"
        )
    seed_everything(cfg.seed, deterministic=info.device.type == "cpu")
    ckpt_path = (Path(checkpoint) if checkpoint else _default_checkpoint(out_dir)) if eval_only else None
    state = load_checkpoint(ckpt_path)["model"] if ckpt_path else None  # fail before the slow set-up

    from kd.models import build_criterion, build_model
    from kd.models.postprocess import PostProcess

    model = build_model(mcfg).to(info.device)
    criterion = build_criterion(loss_config(params, role), mcfg["num_classes"]).to(info.device)
    postprocess = PostProcess(num_select=min(100, mcfg["num_queries"] * mcfg["num_classes"]))
    train_loader, val_loader, val_set = _loaders(params, cfg, info, with_train=not eval_only)

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        from kd.evaluation import CocoEvaluator

        evaluator = CocoEvaluator(val_set.coco, val_set.label_to_cat_id)
        return evaluate(
            m, val_loader, postprocess, evaluator, device=info.device, amp=cfg.amp, max_iters=max_iters
        )

    if ckpt_path is not None:
        load_model_state(model, state, ckpt_path)
        metrics = evaluate_fn(model)
        if D.is_main_process():
            write_json_atomic(
                metrics_path or out_dir / "eval.json", {"checkpoint": str(ckpt_path), **metrics}
            )
        return metrics

    seed_everything(cfg.seed + info.rank, deterministic=info.device.type == "cpu")  # per-rank dropout streams
    if loss_factory is None and role == "student":
        from kd.distill.build import loss_factory as distill_factory

        loss_factory = distill_factory(params)  # None unless distill.method is set
    loss_fn = loss_factory(model, criterion) if loss_factory else criterion_loss(criterion)
    extra = loss_fn if isinstance(loss_fn, nn.Module) else None
    # before the DDP wrap: lr_backbone == 0 freezes the backbone here, and DDP must not expect its gradients
    optimizer = build_optimizer(model, cfg, extra)
    if info.world_size > 1:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
        )
    iters = len(train_loader) if max_iters is None else min(len(train_loader), max_iters)
    scheduler = build_scheduler(optimizer, cfg, iters)
    return fit(
        model,
        loss_fn,
        train_loader,
        optimizer,
        scheduler,
        cfg,
        out_dir,
        device=info.device,
        evaluate_fn=evaluate_fn,
        model_config=mcfg,
        extra=extra,
        max_iters=max_iters,
        run_settings=run_settings(params, role),
        on_change=on_change,
    )


RESUMABLE_KEYS = ("epochs", "eval_every", "log_every", "num_workers", "find_unused_parameters")


def run_settings(params: dict, role: str) -> dict:
    """What decides ``role``'s training trajectory, as stored in its checkpoints: the model, loss and data
    settings, the train settings except those a resumed run may change (:data:`RESUMABLE_KEYS`, e.g. more
    ``epochs``; not under a cosine schedule, which ``epochs`` shapes) and, for a distilled student, the
    method's settings, the teacher's model config and the SHA-256 of the teacher checkpoint. JSON-like
    (plain containers and scalars)."""
    train = dataclasses.asdict(train_config(params, role))
    if train["lr_schedule"] == "step":  # the default: a checkpoint from before these keys still matches
        ignored = (*RESUMABLE_KEYS, "lr_schedule", "lr_min_ratio")
    else:  # the cosine's length is epochs
        ignored = tuple(k for k in RESUMABLE_KEYS if k != "epochs")
    train = {k: v for k, v in train.items() if k not in ignored}
    settings = {
        "role": role,
        "model": model_config(params, role),
        "loss": loss_config(params, role),
        "train": train,
        "data": params.get("data") or {},
    }
    method = ((params.get("distill") or {}).get("method") or "none") if role == "student" else "none"
    if method != "none":
        from kd.distill.build import distiller_config

        teacher_ckpt = Path(params["distill"]["teacher_checkpoint"])
        digest = hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest() if teacher_ckpt.is_file() else None
        settings["distill"] = {
            "method": method,
            "config": dataclasses.asdict(distiller_config(params, method)),
            "teacher_model": model_config(params, "teacher"),
            "teacher_sha256": digest,
        }
    return json.loads(json.dumps(settings, default=str))  # tuples -> lists, as a reloaded checkpoint has them


def _default_checkpoint(out_dir: Path) -> Path:
    best = out_dir / "best.pt"
    return best if best.is_file() else out_dir / "last.pt"


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)  # torch seeds python's random in workers, not numpy


def _loaders(params: dict, cfg: TrainConfig, info: D.DistInfo, with_train: bool):
    """(train loader or None, val loader, val dataset); each process loads batch_size / world_size images."""
    from kd.data.coco import build_dataset, collate_fn

    data = params.get("data") or {}
    root, transforms = data.get("root", "data"), data.get("transforms") or {}
    per_rank = cfg.batch_size // info.world_size
    common = dict(
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        worker_init_fn=_seed_worker,
        pin_memory=info.device.type == "cuda",
    )
    preset = data.get("name", "synthetic")
    val_set = build_dataset(root, "val", transforms, train=False, preset=preset)
    val_loader = DataLoader(
        val_set,
        batch_size=per_rank,
        sampler=ShardSampler(len(val_set), info.rank, info.world_size),
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    if not with_train:
        return None, val_loader, val_set
    train_set = build_dataset(root, "train", transforms, train=True, preset=preset)
    if info.world_size > 1:
        sampler = DistributedSampler(
            train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    else:
        sampler = EpochSampler(len(train_set), seed=cfg.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{root}: the train split has {len(train_set)} images, fewer than batch_size {cfg.batch_size}"
        )
    return train_loader, val_loader, val_set


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kd.train", description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=ROLES, required=True, help="which model of params.yaml to train")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params value, e.g. --set teacher.train.epochs=2 (repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics, plots)")
    p.add_argument("--max-iters", type=int, default=None, help="cap iterations per epoch (smoke runs)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint to evaluate (default: <out>/best.pt or last.pt)"
    )
    p.add_argument(
        "--metrics", default=None, help="with --eval-only: metrics JSON path (default: <out>/eval.json)"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="if <out>/last.pt was trained with other settings, delete that run and train from scratch "
        "(default: refuse)",
    )
    args = p.parse_args(argv)
    if args.max_iters is not None and args.max_iters < 1:
        p.error(f"--max-iters must be >= 1; got {args.max_iters}")
    if args.checkpoint and not args.eval_only:
        p.error("--checkpoint needs --eval-only (training resumes from <out>/last.pt by itself)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        params = load_params(args.params, args.overrides)
        validate(params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(
            params,
            args.role,
            args.out,
            max_iters=args.max_iters,
            eval_only=args.eval_only,
            checkpoint=args.checkpoint,
            metrics_path=args.metrics,
            device=args.device,
            on_change="restart" if args.restart else "error",
        )
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        main_process = D.is_main_process()
        D.cleanup()
    if main_process:
        shown = result.get("val", {}) if not args.eval_only else result
        print(" ".join(f"{k} {v:.4f}" for k, v in shown.items() if isinstance(v, float) and math.isfinite(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
