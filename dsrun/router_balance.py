"""DeepSeek-V3's auxiliary-loss-free load balancing (DeepSeek-V3 technical report, section 2.1.2).

A V3 router adds a per-expert bias (`e_score_correction_bias`) to its scores when it picks each token's top-k
experts; the gate weights use the scores without it. After every optimizer step the bias of an expert that
received more than its layer's mean number of tokens falls by `optim.router_bias_rate`, that of one that
received fewer rises by it. transformers reads the bias but never updates it, so a fine-tune through it leaves the
routing to drift; torchtitan updates it the same way (`load_balance_coeff`, 1e-3), centring each layer's change.

The counts stay on the device (no host sync); they are summed over every rank before the update, so every rank
applies the same change to its replica of the bias (a buffer: DDP broadcasts it, FSDP2 does not shard it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BIAS = "e_score_correction_bias"  # transformers' name for the V3 router's selection bias


class RouterBalance:
    """Counts each router's choices during training forwards; `update()` after the step moves the biases."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        # only routers that train: under an adapter the base (routers included) is frozen, and an adapter folder
        # could not carry a changed bias to the exported or served model
        # routers carry a plain attribute dsrun_load (below): Any, not nn.Module
        self.routers: list[Any] = [m for m in model.modules() if isinstance(getattr(m, BIAS, None), torch.Tensor)
                        and getattr(m, "weight", None) is not None and m.weight.requires_grad] if rate > 0 else []
        for router in self.routers:
            # a plain attribute, not a buffer: DDP would overwrite every rank's counts with rank 0's each forward
            router.dsrun_load = torch.zeros_like(getattr(router, BIAS))
            router.register_forward_hook(_count)

    def update(self, stepped: torch.Tensor, all_reduce: Any) -> None:
        """After the optimizer step (`stepped`: a device bool, false when a non-finite step was skipped)."""
        if not self.routers:
            return
        loads = all_reduce(torch.stack([router.dsrun_load for router in self.routers]))  # [layers, experts]
        change = self.rate * torch.sign(loads.mean(dim=1, keepdim=True) - loads)
        change = torch.where(stepped, change - change.mean(dim=1, keepdim=True), 0.0)
        with torch.no_grad():
            for router, delta in zip(self.routers, change):
                getattr(router, BIAS).add_(delta)
                router.dsrun_load.zero_()


def _count(router: Any, inputs: Any, output: Any) -> None:
    """Forward hook: add this forward's expert choices (the router's last output) to its counts. Training forwards
    only: eval passes run under no_grad; an activation-checkpointing recompute counts a layer twice over, which
    scales its counts and leaves the signs of the update as they were."""
    if router.training and torch.is_grad_enabled():
        chosen = output[-1].reshape(-1)
        router.dsrun_load.index_add_(0, chosen, torch.ones_like(chosen, dtype=router.dsrun_load.dtype))
