"""parallel x precision x hardware -> a Lightning Fabric; the NCCL/Gloo environment is applied before it starts."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from dsrun.errors import UserError

FABRIC_PRECISION = {"32-true": "32-true", "16-mixed": "16-mixed", "bf16-mixed": "bf16-mixed",
                    "bf16-true": "bf16-true"}


def world_size(cfg: Any) -> int:
    return cfg.hardware.devices * cfg.hardware.num_nodes


def data_parallel_size(cfg: Any) -> int:
    tp = cfg.parallel.tensor_parallel_size if cfg.parallel.strategy == "tp" else 1
    return world_size(cfg) // tp


def data_parallel_rank(global_rank: int, cfg: Any) -> int:
    """Ranks of one tensor-parallel group read the same data (Fabric's mesh is (data_parallel, tensor_parallel))."""
    return global_rank // (world_size(cfg) // data_parallel_size(cfg))


def global_batch(cfg: Any) -> int:
    """Sequences per optimizer step: the one place this product is computed."""
    return cfg.train.micro_batch * cfg.train.accumulation * data_parallel_size(cfg)


def apply_environment(hardware_cfg: Any) -> None:
    """The hardware option's NCCL/Gloo variables; a variable the user already exported wins."""
    for name, value in hardware_cfg.env.items():
        os.environ.setdefault(str(name), str(value))


def check_environment(cfg: Any) -> None:
    """What the config cannot know: does this machine have the devices it asks for? (Not for plan / dry runs.)"""
    from dsrun.hardware import cuda_devices_present

    hw = cfg.hardware
    if hw.accelerator == "cuda":
        present = cuda_devices_present()
        if hw.devices > present:
            raise UserError(f"hardware={hw.name} asks for {hw.devices} GPUs per node but this machine has {present}; "
                            f"set hardware.devices={present or 1}{' or hardware=cpu' if not present else ''}, "
                            "or use task=plan to plan without the GPUs")


def build_fabric(cfg: Any):
    import lightning as L
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    from dsrun.parallelize import parallelize

    apply_environment(cfg.hardware)
    accelerator = "cuda" if cfg.hardware.accelerator == "cuda" else "cpu"
    backend = "nccl" if accelerator == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    precision = FABRIC_PRECISION[cfg.precision.mode]
    if cfg.parallel.strategy == "single":
        strategy: Any = "auto"
    elif cfg.parallel.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend=backend, timeout=timeout)
    elif cfg.parallel.strategy in ("fsdp", "tp"):
        tp = cfg.parallel.tensor_parallel_size if cfg.parallel.strategy == "tp" else 1
        strategy = ModelParallelStrategy(
            parallelize_fn=lambda model, mesh: parallelize(model, cfg, mesh), data_parallel_size=world_size(cfg) // tp,
            tensor_parallel_size=tp, process_group_backend=backend, timeout=timeout)
        if precision in ("bf16-mixed", "16-mixed"):
            precision = "32-true"  # FSDP2 applies mixed precision itself (parallelize.apply_fsdp)
    else:  # validate() refuses strategies whose backend has not landed
        raise AssertionError(cfg.parallel.strategy)
    return L.Fabric(accelerator=accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
                    strategy=strategy, precision=precision)


def setup(fabric: Any, cfg: Any, model: Any, make_optimizer: Any) -> tuple[Any, Any]:
    """Wrap the model for its strategy and build the optimizer in the order that strategy needs: after sharding
    for FSDP2/TP (the optimizer must see the DTensor parameters)."""
    from lightning.fabric.strategies import ModelParallelStrategy

    from dsrun.parallelize import parallelize

    if isinstance(fabric.strategy, ModelParallelStrategy):
        model = fabric.setup_module(model)  # calls parallelize() with the device mesh
        return model, fabric.setup_optimizers(make_optimizer(model))
    model = parallelize(model, cfg)  # activation checkpointing / compile only
    return fabric.setup(model, make_optimizer(model))


def clip_gradients(fabric: Any, optimizer: Any, params: Any, max_norm: float) -> Any:
    """Clip to max_norm (0: measure only) and return the total gradient norm before clipping.

    Norms accumulate in fp64, so every strategy reports the same norm whatever its summation order (an fp32 sum
    over a 129k-row embedding drifts ~1e-5 between sharded and unsharded layouts). Under FSDP2 + TP gradients live
    on different meshes (2-D for tensor-parallel weights, 1-D for the rest), which torch's clip_grad_norm_ cannot
    stack: take the norm per mesh, reduce each, combine."""
    import torch

    fabric.strategy.precision.unscale_gradients(optimizer)  # fp16 loss scaling; a no-op otherwise
    groups: dict[Any, list[Any]] = {}
    for p in params:
        if p.grad is not None:
            key = (getattr(p.grad, "device_mesh", None), getattr(p.grad, "placements", None))
            groups.setdefault(key, []).append(p)
    squares = []
    for group in groups.values():
        sq = sum(torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2 for p in group)
        squares.append(sq.full_tensor() if hasattr(sq, "full_tensor") else sq)
    total = torch.stack(squares).sum().sqrt().float()
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
