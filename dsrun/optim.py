"""The optimizer registry (the `optim` group; its learning-rate schedule: dsrun/schedule.py).

Adding an optimizer: conf/optim/<name>.yaml and one entry in OPTIMIZERS (its builder, and the optim.* keys only it
reads, so the pre-check refuses them under another optimizer instead of ignoring them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Optional

if TYPE_CHECKING:
    import torch


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd only
    warmup_steps: Optional[int] = None  # null: 10, or a tenth of a shorter run (dsrun/schedule.py)
    min_lr_ratio: float = 0.1  # cosine, linear and wsd decay to lr * min_lr_ratio
    grad_clip: Optional[float] = None  # null: the precision's default; 0 turns clipping off
    scale_lr_with_data_parallel: bool = False  # lr x data-parallel size (the linear scaling rule for a
    # global batch that grows with the processes)
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay): dsrun/schedule.py
    decay_fraction: float = 0.2  # wsd: the share of the run its decay tail takes
    router_bias_rate: float = 1e-3  # DeepSeek-V3 routers' load-balancing bias step per step (dsrun/router_balance.py)


@dataclass(frozen=True)
class Optimizer:
    build: Callable[..., Any]  # (optim config, params, lr, fused) -> torch.optim.Optimizer
    states: Callable[[Any], int]  # state tensors per parameter (the planner's memory): required, never guessed
    reads: tuple[str, ...] = ()  # optim.* keys only this optimizer reads
    state_bytes: float | None = None  # bytes per state element; None: the trained weight's width
    sharded: bool = True  # works on FSDP2/TP's DTensor parameters and inside DeepSpeed


def _sgd(optim: OptimConfig, params: list[torch.nn.Parameter], lr: float, fused: bool) -> torch.optim.Optimizer:
    import torch

    # exact gradient-parity tests use it: AdamW turns float noise in near-zero gradients into full-size steps
    return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _adamw(optim: OptimConfig, params: list[torch.nn.Parameter], lr: float, fused: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused)


def _adamw8bit(optim: OptimConfig, params: list[torch.nn.Parameter], lr: float, fused: bool) -> Any:
    import bitsandbytes as bnb

    # bitsandbytes' block-wise 8-bit moments: 2 bytes of state per parameter instead of 8 (tensors under 4,096
    # elements keep fp32 states, as bitsandbytes decides)
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps,
                               weight_decay=optim.weight_decay)


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(_adamw, states=lambda optim: 2, reads=("betas", "eps")),
    "adamw8bit": Optimizer(_adamw8bit, states=lambda optim: 2, reads=("betas", "eps"), state_bytes=1.0,
                           sharded=False),
    "sgd": Optimizer(_sgd, states=lambda optim: int(bool(optim.momentum)), reads=("momentum",)),
}


def build_optimizer(optim: OptimConfig, params: list[torch.nn.Parameter], *, lr: float,
                    fused: bool) -> torch.optim.Optimizer:
    return OPTIMIZERS[optim.name].build(optim, params, lr, fused)
