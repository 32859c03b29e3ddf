"""The one checkpoint format: save atomically, load safely, restore model / optimizer / RNG state.

A checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``)::

    model      state dict of the (unwrapped) model
    optimizer  optimizer state dict (or None)
    scheduler  lr scheduler state dict (or None)
    scaler     GradScaler state dict (or None)
    epoch      last completed epoch (0-based; -1 before the first)
    step       optimizer steps taken so far
    rng        {"torch", "numpy", "python", "cuda"} generator states at save time (+ "ranks" under DDP)
    config     the model config dict the model was built from
    metrics    dict of metrics at save time
    extra      state dict of trainable modules outside the model (e.g. distiller adapters), or None
    ema        state dict of the weights' moving average (kd.ema.ModelEMA), or None
    run        the settings that decide the training trajectory (kd.train.run_settings; {} when unknown):
               a resume with other settings is refused, or restarts from scratch on request
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd.io import save_torch_atomic

CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step",
    "rng",
    "config",
    "metrics",
    "extra",
    "ema",
    "run",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rng_state() -> dict:
    """The states of the torch, numpy, python (and CUDA) global generators, as weights_only-safe types."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global generators from :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int = -1,
    step: int = 0,
    config: dict | None = None,
    metrics: dict | None = None,
    extra: nn.Module | None = None,
    ema: nn.Module | None = None,
    rng: dict | None = None,
    run: dict | None = None,
) -> dict:
    """Assemble the checkpoint dict (see the module docstring); RNG states are captured now unless given
    (under DDP ``rng["ranks"]`` lists every rank's state). ``run``: the settings that decide the training
    trajectory (:func:`kd.train.run_settings`), compared before a resume."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng if rng is not None else rng_state(),
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
        "extra": extra.state_dict() if extra is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "run": dict(run or {}),
    }


def save_checkpoint(path: str | Path, model: nn.Module, **kwargs: Any) -> Path:
    """Write a checkpoint atomically (temp file in the same directory, then ``os.replace``).

    ``kwargs`` are those of :func:`make_checkpoint`. A crash during the write leaves any previous file at
    ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(make_checkpoint(model, **kwargs), path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` on the CPU.

    Raises ValueError naming the file when it is missing, truncated or corrupt, holds objects other than
    tensors and plain containers (such a pickle is refused without running any of its code), or is not a
    checkpoint dict with a ``model`` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).partition("WeightsUnpickler error:")[2].strip()
        detail = detail.splitlines()[0].split(". ")[0] if detail else _first_line(e)
        if "Unsupported global" in detail:  # an object that would run code when unpickled
            raise ValueError(
                f"{path}: refused to load, not a plain tensor checkpoint ({detail[:160]})"
            ) from None
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({detail[:160]})") from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError) as e:
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: not a kd checkpoint (expected a dict with a 'model' state dict)")
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].split('. ')[0][:160]}" if text else type(e).__name__


def load_model_state(model: nn.Module, state: dict, path: str | Path = "<state>") -> None:
    """Load ``state`` into ``model`` strictly; a checkpoint of another architecture or class count is a
    ValueError naming the first few missing, unexpected and shape-mismatched keys."""
    target = unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    problems = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{name} {len(keys)}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not fit {type(target).__name__}: {'; '.join(problems)}")
    target.load_state_dict(state, strict=True)
