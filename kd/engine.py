"""Training and evaluation loops: optimizer and lr schedule, AMP, clipping, checkpoint + resume, DDP.

The loss is pluggable: :func:`fit` and :func:`train_one_epoch` take a ``loss_fn(model, images, mask,
targets) -> dict[str, Tensor]`` of weighted terms (summed for the backward pass). The default,
:func:`criterion_loss`, runs the detector and the set criterion; a distiller supplies its own function
that adds its terms.

Reproducibility: the data order of epoch ``e`` is drawn from ``seed + e`` (:class:`EpochSampler` or
``DistributedSampler.set_epoch``), and ``out_dir/last.pt`` holds the model, optimizer, scheduler, scaler and
every global RNG state, so a run interrupted after any epoch and resumed ends with the same weights (bitwise
on the CPU) as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm.std import tqdm

from kd import distributed as D
from kd.checkpoint import load_checkpoint, load_model_state, rng_state, save_checkpoint, set_rng_state, unwrap
from kd.config import TrainConfig
from kd.ema import ModelEMA
from kd.io import atomic_write, write_json_atomic
from kd.runtime import cpu_bf16_flags

log = logging.getLogger(__name__)
_AUX_TERM = re.compile(r"_\d+$")  # loss terms of intermediate decoder layers (kept out of log lines)

Batch = tuple[Tensor, Tensor, list[dict[str, Any]]]
LossFn = Callable[[nn.Module, Tensor, Tensor, list[dict[str, Any]]], dict[str, Tensor]]

# name fragments of Deformable DETR's offset / reference-point projections (lr * lr_linear_proj_mult)
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped before the step was applied."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch, numpy and python; on request use deterministic algorithms (bitwise-reproducible on CPU)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``: ``set_epoch`` before each epoch."""

    def __init__(self, data_len: int, seed: int = 0, shuffle: bool = True) -> None:
        self.data_len = data_len
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.data_len))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.data_len, generator=g).tolist())

    def __len__(self) -> int:
        return self.data_len


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` of ``n`` takes items ``r, r+n, ...`` (no padding, no repeats)."""

    def __init__(self, data_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, data_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def criterion_loss(criterion: nn.Module) -> LossFn:
    """The default loss: ``criterion(model(images, mask, targets=targets), targets)``."""

    def loss_fn(
        model: nn.Module, images: Tensor, mask: Tensor, targets: list[dict[str, Any]]
    ) -> dict[str, Tensor]:
        return criterion(model(images, mask, targets=targets), targets)

    return loss_fn


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW with three parameter groups, matched by name: ``backbone.*`` at ``lr_backbone``, Deformable
    DETR's ``sampling_offsets`` / ``reference_points`` at ``lr * lr_linear_proj_mult``, the rest (and the
    trainable parameters of ``extra``, e.g. distiller adapters) at ``lr``. Frozen parameters are skipped.
    ``lr_backbone == 0`` freezes the backbone, as DETR's ``train_backbone = lr_backbone > 0``."""
    lr_backbone = cfg.lr if cfg.lr_backbone is None else cfg.lr_backbone
    if lr_backbone == 0:
        for name, p in unwrap(model).named_parameters():
            if name.startswith("backbone.") or ".backbone." in name:
                p.requires_grad_(False)
    groups: dict[str, dict] = {
        "main": {"name": "main", "params": [], "lr": cfg.lr},
        "backbone": {"name": "backbone", "params": [], "lr": lr_backbone},
        "linear_proj": {"name": "linear_proj", "params": [], "lr": cfg.lr * cfg.lr_linear_proj_mult},
    }
    named = list(unwrap(model).named_parameters())
    if extra is not None:
        named += [(f"extra.{n}", p) for n, p in extra.named_parameters()]
    seen: set[int] = set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:  # frozen, or shared between the model and ``extra``
            continue
        seen.add(id(p))
        if name.startswith("backbone.") or ".backbone." in name:
            groups["backbone"]["params"].append(p)
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            groups["linear_proj"]["params"].append(p)
        else:
            groups["main"]["params"].append(p)
    return torch.optim.AdamW(
        [g for g in groups.values() if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay
    )


class WarmupStepSchedule:
    """lr factor at optimizer step ``s``: linear warm-up over ``warmup_iters`` steps, times ``gamma`` from
    step ``drop_step`` on (the ``lr_drop`` epoch). A plain object, so LambdaLR's state dict captures it."""

    def __init__(self, warmup_iters: int, drop_step: int | None, gamma: float) -> None:
        self.warmup_iters = warmup_iters
        self.drop_step = drop_step
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_iters) if self.warmup_iters > 0 else 1.0
        drop = self.gamma if self.drop_step is not None and step >= self.drop_step else 1.0
        return warm * drop


class WarmupCosineSchedule:
    """lr factor at optimizer step ``s``: linear warm-up over ``warmup_iters`` steps, then a half cosine from
    1 down to ``min_ratio`` at ``total_steps`` (the end of training), ``min_ratio`` after it."""

    def __init__(self, warmup_iters: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_iters = warmup_iters
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup_iters > 0 and step < self.warmup_iters:
            return (step + 1) / self.warmup_iters
        span = max(1, self.total_steps - self.warmup_iters)
        t = min(1.0, (step - self.warmup_iters) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR (resumable via its state dict): :class:`WarmupStepSchedule` for
    ``lr_schedule: step``, :class:`WarmupCosineSchedule` over ``epochs`` for ``lr_schedule: cosine``."""
    if cfg.lr_schedule == "cosine":
        rule = WarmupCosineSchedule(cfg.warmup_iters, cfg.epochs * iters_per_epoch, cfg.lr_min_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
    drop_step = None if cfg.lr_drop is None else cfg.lr_drop * iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupStepSchedule(cfg.warmup_iters, drop_step, cfg.lr_drop_gamma)
    )


def resolve_amp(amp: str, device: torch.device) -> str:
    """``amp`` with ``auto`` made concrete for ``device``: ``bf16`` where it runs natively (a CUDA device that
    supports it; a CPU with AVX-512 BF16 / AMX, where it is ~1.1-1.25x faster than fp32), else ``none``
    (without those instructions CPU bf16 is emulated, 5-7x slower: bench/README "amp_speed.py").
    Every other mode is returned as it is."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_flags() else "none"
    return "none"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for amp = bf16 | fp16 | auto (:func:`resolve_amp`) on ``device``; no-op for none."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move ``(images [B,3,H,W], mask [B,H,W], targets)`` to ``device`` (tensors inside targets too)."""
    images, mask, targets = batch
    nb = device.type == "cuda"
    targets = [
        {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images.to(device, non_blocking=nb), mask.to(device, non_blocking=nb), targets


def check_finite(losses: dict[str, Tensor], where: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the first NaN/inf term (on any rank; one host sync)."""
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()]).float()
    bad = D.all_reduce_max(bad)
    if bool(bad.any()):
        names = [k for k, b in zip(losses, bad.tolist(), strict=True) if b]
        values = ", ".join(f"{k}={losses[k].detach().float().sum().item()}" for k in names)
        raise NonFiniteLossError(f"non-finite loss term {names[0]} at {where} ({values})")


def _progress(total: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        disable=not D.is_main_process(),
        mininterval=0.5 if tty else 10.0,
        file=sys.stderr,
        dynamic_ncols=tty,
    )


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    device: torch.device,
    epoch: int,
    step: int,
    clip_max_norm: float = 0.0,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    max_iters: int | None = None,
    log_every: int = 50,
    ema: ModelEMA | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (mean of each loss term and ``loss`` over the epoch and all
    processes, plus ``lr``; the updated global step). ``ema`` is updated after every optimizer step.

    Raises :class:`NonFiniteLossError` before applying a step whose loss is NaN/inf.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n_iters = len(loader) if max_iters is None else min(len(loader), max_iters)  # type: ignore[arg-type]
    sums: dict[str, Tensor] = {}
    n = 0
    bar = _progress(n_iters, f"epoch {epoch}")
    for i, batch in enumerate(loader):
        if i >= n_iters:
            break
        images, mask, targets = to_device(batch, device)
        with autocast(device, amp):
            losses = loss_fn(model, images, mask, targets)
        check_finite(losses, f"epoch {epoch} step {step}")
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if isinstance(loss_fn, nn.Module):
            D.average_gradients(loss_fn)  # distiller adapters live outside the DDP-wrapped model
        if clip_max_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        n += 1
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        bar.update(1)
        if log_every and step % log_every == 0 and D.is_main_process():
            terms = {k: v.item() for k, v in {"loss": loss, **losses}.items() if not _AUX_TERM.search(k)}
            bar.write(
                f"epoch {epoch} step {step} {_fmt(terms)} lr {_main_lr(optimizer):.3g}", file=sys.stderr
            )
    bar.close()
    means = D.all_reduce_dict({k: v / max(n, 1) for k, v in sums.items()})
    stats = {k: float(v) for k, v in means.items()}
    stats["lr"] = _main_lr(optimizer)
    return stats, step


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    for g in optimizer.param_groups:
        if g.get("name", "main") == "main":
            return float(g["lr"])
    return float(optimizer.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    postprocess: nn.Module,
    evaluator: Any,
    *,
    device: torch.device,
    amp: str = "none",
    max_iters: int | None = None,
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``loader`` (every rank evaluates its shard; all get the same dict).

    ``evaluator`` is a fresh :class:`kd.evaluation.CocoEvaluator` (update / summarize); ``postprocess``
    maps ``(logits [B,Q,C], boxes [B,Q,4], orig sizes [B,2])`` to absolute xyxy detections.
    """
    net = unwrap(model)  # no DDP forward: ranks may see different numbers of batches
    was_training = net.training
    net.eval()
    for i, batch in enumerate(loader):
        if max_iters is not None and i >= max_iters:
            break
        images, mask, targets = to_device(batch, device)
        with autocast(device, amp):
            out = net(images, mask)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        preds = postprocess(out.logits.float(), out.boxes.float(), sizes)
        evaluator.update(
            [{"image_id": int(t["image_id"])} for t in targets],
            [{k: v.cpu() for k, v in p.items()} for p in preds],
        )
    net.train(was_training)
    return {k: float(v) for k, v in evaluator.summarize().items()}


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    model_config: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: nn.Module | None = None,
    max_iters: int | None = None,
    resume: bool = True,
    run_settings: dict | None = None,
    on_change: str = "error",
) -> dict:
    """Train for ``cfg.epochs`` epochs, evaluating every ``cfg.eval_every`` epochs (and after the last).

    Writes (rank 0, atomically) ``out_dir/last.pt`` after every epoch, ``best.pt`` at the best ``AP``,
    ``plots/train.tsv`` and ``plots/val.tsv`` (one row per epoch) and ``metrics.json`` (the summary). With
    ``resume`` it continues from ``out_dir/last.pt`` when present: model, optimizer, scheduler (with its
    warm-up / lr_drop settings), scaler and RNG states come from the checkpoint, so only ``epochs`` may be
    raised for a resumed run. ``extra``: trainable modules outside the model (already in ``optimizer``)
    whose state is checkpointed too. Returns the summary dict.

    ``run_settings`` (JSON-like, :func:`kd.train.run_settings`) is stored in every checkpoint; a
    ``last.pt`` written with other settings (or none) is not resumed silently: ``on_change="error"`` raises
    ValueError naming the file and the first differing settings, ``"restart"`` (what the DVC stages use: a
    changed parameter must retrain, not resume the stale run) deletes the stale run's files and trains from
    scratch. ``None`` skips the check.

    With ``cfg.ema_decay`` > 0 an exponential moving average of the weights (:class:`kd.ema.ModelEMA`) is
    kept alongside: it is what gets evaluated and what ``best.pt`` holds as its ``model`` (the raw weights
    stay in ``last.pt`` for resuming, with the average under ``ema``).

    Each step costs one host sync, for the non-finite loss check (the matcher syncs anyway).
    """
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cpu" and amp == "bf16" and not cpu_bf16_flags():
        log.warning("amp bf16 on a CPU without AVX-512 BF16 / AMX runs 5-7x slower than amp none (amp: auto)")
    if cfg.amp == "auto":
        log.info("amp auto: %s on this %s", amp, device.type)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start_epoch, step, state = 0, 0, {"train": {}, "val": {}, "best": {}}
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema_decay > 0 else None
    if on_change not in ("error", "restart"):
        raise ValueError(f"fit: on_change must be 'error' or 'restart', got {on_change!r}")
    ckpt = load_checkpoint(last) if resume and last.is_file() else None
    if ckpt is not None and run_settings is not None and not _same_run(last, ckpt, run_settings, on_change):
        ckpt = None
    if ckpt is not None:
        load_model_state(model, ckpt["model"], last)
        if ema is not None:
            if ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("%s holds no EMA weights: the average starts from the resumed model", last)
                ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if extra is not None and ckpt.get("extra") is not None:
            extra.load_state_dict(ckpt["extra"])
        ranks = ckpt["rng"].get("ranks") or []
        set_rng_state(ranks[D.get_rank()] if D.get_rank() < len(ranks) else ckpt["rng"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        state = {k: ckpt["metrics"].get(k, {}) for k in state}
        log.info("resumed from %s at epoch %d (step %d)", last, start_epoch, step)
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(train_loader, cfg.seed, epoch)
        train_stats, step = train_one_epoch(
            model,
            loss_fn,
            train_loader,
            optimizer,
            scheduler,
            device=device,
            epoch=epoch,
            step=step,
            clip_max_norm=cfg.clip_max_norm,
            amp=amp,
            scaler=scaler,
            max_iters=max_iters,
            log_every=cfg.log_every,
            ema=ema,
        )
        state["train"] = {"epoch": epoch, "step": step, **train_stats}
        if evaluate_fn is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            state["val"] = {"epoch": epoch, **evaluate_fn(model if ema is None else ema.module)}
            ap = state["val"].get("AP")
            if ap is not None and (not state["best"] or ap > state["best"]["AP"]):
                state["best"] = dict(state["val"])  # every COCO metric of the best epoch
        rng = rng_state()
        if D.get_world_size() > 1:
            rng["ranks"] = D.all_gather_object(rng_state())
        if D.is_main_process():
            _write_epoch(out_dir, epoch, state)
            save_checkpoint(
                last,
                model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                epoch=epoch,
                step=step,
                config=model_config,
                metrics=state,
                extra=extra,
                ema=ema,
                rng=rng,
                run=run_settings,
            )
            if state["best"].get("epoch") == epoch and ema is not None:
                best = out_dir / "best.pt"
                save_checkpoint(best, ema.module, epoch=epoch, step=step, config=model_config, metrics=state)
            elif state["best"].get("epoch") == epoch:
                with atomic_write(out_dir / "best.pt") as tmp:
                    shutil.copyfile(last, tmp)
        if D.is_main_process():
            brief = {k: v for k, v in train_stats.items() if not _AUX_TERM.search(k)}
            val = {f"val_{k}": state["val"][k] for k in ("AP", "AP50") if state["val"].get("epoch") == epoch}
            log.info("epoch %d done: %s", epoch, _fmt({**brief, **val}))
    summary = {"epochs": cfg.epochs, "step": step, **state}
    if D.is_main_process():
        write_json_atomic(out_dir / "metrics.json", summary)
    D.barrier()
    return summary


def _same_run(last: Path, ckpt: dict, run_settings: dict, on_change: str) -> bool:
    """Whether ``ckpt`` (loaded from ``last``) may be resumed under ``run_settings``; on a mismatch raise
    (``"error"``) or delete the stale run's files and return False (``"restart"``)."""
    stored = ckpt.get("run") or {}
    changed = settings_diff(stored, run_settings)
    if not changed:
        return True
    what = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if not stored:
        what = "it records none: written by an older kd"
    if on_change == "error":
        raise ValueError(
            f"{last}: written by a run with other settings ({what}); train from scratch with --restart "
            "(deletes that run) or choose another --out"
        )
    D.barrier()  # every rank has read ``last`` before rank 0 deletes it
    if D.is_main_process():
        log.warning("%s: written by a run with other settings (%s): training from scratch", last, what)
        out_dir = last.parent
        for stale in (last, out_dir / "best.pt", out_dir / "metrics.json", *out_dir.glob("plots/*.tsv")):
            stale.unlink(missing_ok=True)
    D.barrier()
    return False


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf that differs between two nested dicts (dotted keys, sorted)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s data order and worker seeds a function of ``(seed, epoch, rank)`` only."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(hash((seed, epoch, D.get_rank())) % 2**63)


def _fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def _write_epoch(out_dir: Path, epoch: int, state: dict) -> None:
    """Append this epoch's rows to the plots TSVs (rows of later epochs, left by a crash, are dropped)."""
    upsert_tsv(out_dir / "plots" / "train.tsv", {"epoch": epoch, **state["train"]})
    if state["val"].get("epoch") == epoch:
        upsert_tsv(out_dir / "plots" / "val.tsv", state["val"])


def upsert_tsv(path: Path, row: dict[str, Any]) -> None:
    """Rewrite the TSV at ``path`` atomically: its rows with ``epoch`` < ``row["epoch"]``, then ``row``.

    Columns are the union of the old header and ``row``'s keys (missing cells empty); ``dvc plots`` reads it.
    """
    rows: list[dict[str, Any]] = []
    columns = list(row)
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            columns = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
            rows = [r for r in reader if int(r["epoch"]) < int(row["epoch"])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", restval="", lineterminator="\n")
    writer.writeheader()
    for r in [*rows, row]:
        writer.writerow({k: _cell(v) for k, v in r.items()})
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v
