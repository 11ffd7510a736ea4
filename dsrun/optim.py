"""Optimizer and learning-rate schedule from the `optim` group."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def build_optimizer(optim_cfg: Any, params: list[torch.nn.Parameter], lr: float, fused: bool) -> torch.optim.Optimizer:
    if optim_cfg.name == "sgd":
        # exact gradient-parity tests use it: AdamW turns float noise in near-zero gradients into full-size steps
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, fused=fused)


def warmup_cosine(optim_cfg: Any, max_steps: int) -> Callable[[int], float]:
    """The lr multiplier of optimizer step `step` (from 0): linear warmup, then cosine decay to min_lr_ratio.
    A pure function of the step, so resuming needs no scheduler state."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, max_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
