"""Learning-rate schedule (per optimiser step), KL warm-up (per step, from 0) and the optimisers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["beta_at", "make_optimizer", "make_scheduler"]


def beta_at(epoch: int, cfg: Mapping[str, Any], step: int = 0, steps_per_epoch: int = 1) -> float:
    """KL weight at optimiser ``step`` (0-based) of 1-based ``epoch``: linear from 0 over
    ``beta_warmup_epochs`` epochs, then ``beta``. The first step of training has weight 0."""
    warm = int(cfg["beta_warmup_epochs"])
    if warm <= 0:
        return float(cfg["beta"])
    done = (int(epoch) - 1) * int(steps_per_epoch) + int(step)
    return float(cfg["beta"]) * min(1.0, done / (warm * int(steps_per_epoch)))


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=float(lr), weight_decay=float(weight_decay))


def make_scheduler(opt: torch.optim.Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    total = int(cfg["epochs"]) * steps_per_epoch
    warm = min(int(cfg["warmup_epochs"]) * steps_per_epoch, max(total - 1, 0))
    if cfg["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(cfg["lr"]), total_steps=max(total, 2),
            pct_start=max(warm / max(total, 1), 0.01))
    floor = float(cfg["min_lr_fraction"])

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


