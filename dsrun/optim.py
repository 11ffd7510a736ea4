"""Optimizer from the `optim` group (its learning-rate schedule: dsrun/schedule.py)."""

from __future__ import annotations

from typing import Any

import torch


def build_optimizer(optim_cfg: Any, params: list[torch.nn.Parameter], lr: float, fused: bool) -> torch.optim.Optimizer:
    if optim_cfg.name == "sgd":
        # exact gradient-parity tests use it: AdamW turns float noise in near-zero gradients into full-size steps
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, fused=fused)
