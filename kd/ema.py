"""Exponential moving average (EMA) of a detector's weights, the copy DINO / RT-DETR evaluate and ship.

``W_ema <- d_t * W_ema + (1 - d_t) * W`` after every optimizer step, with the decay ramped up as in
RT-DETR's ``ModelEMA``: ``d_t = decay * (1 - exp(-t / tau))`` for the t-th update, so the first updates
follow the fast-moving weights of early training and the average only lengthens later (``tau = 0``: a
constant decay). Only the parameters that train are averaged (a frozen backbone is copied once, not
re-averaged every step); floating-point buffers (batch-norm statistics) are averaged too, integer buffers
copied. The EMA never feeds back into training, so a run with it follows the same trajectory as one
without and differs only in what is evaluated and saved (``kd.engine.fit``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from kd.checkpoint import unwrap


class ModelEMA(nn.Module):
    """An averaged copy of ``model`` (``.module``), updated by :meth:`update` after each step.

    Args:
        model: the model being trained (a DDP wrapper is unwrapped).
        decay: the asymptotic decay in (0, 1); the average spans about ``1 / (1 - decay)`` steps.
        tau: ramp constant in steps (0 disables the ramp).
    """

    def __init__(self, model: nn.Module, decay: float, tau: float = 0.0) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1); got {decay}")
        if tau < 0:
            raise ValueError(f"ema tau must be >= 0; got {tau}")
        self.module = copy.deepcopy(unwrap(model)).requires_grad_(False)
        self.decay, self.tau = float(decay), float(tau)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, t: int) -> float:
        """The decay applied at the ``t``-th update (1-based)."""
        return self.decay * (1.0 - math.exp(-t / self.tau)) if self.tau > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights into the EMA (call after ``optimizer.step()``)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(int(self.updates))
        src = unwrap(model)
        ema_p: list[Tensor] = []
        src_p: list[Tensor] = []
        pairs = zip(src.named_parameters(), self.module.named_parameters(), strict=True)
        for (name, p), (ema_name, e) in pairs:
            if name != ema_name:
                raise RuntimeError(f"ema: parameter {ema_name!r} does not match the model's {name!r}")
            if p.requires_grad:
                ema_p.append(e)
                src_p.append(p.detach())
        for b, e in zip(src.buffers(), self.module.buffers(), strict=True):
            if e.is_floating_point():
                ema_p.append(e)
                src_p.append(b.detach())
            else:
                e.copy_(b)
        if ema_p:
            torch._foreach_lerp_(ema_p, src_p, weight)
