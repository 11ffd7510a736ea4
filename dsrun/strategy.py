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
    from lightning.fabric.strategies import DDPStrategy

    apply_environment(cfg.hardware)
    accelerator = "cuda" if cfg.hardware.accelerator == "cuda" else "cpu"
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if cfg.parallel.strategy == "single":
        strategy: Any = "auto"
    elif cfg.parallel.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="nccl" if accelerator == "cuda" else "gloo", timeout=timeout)
    else:  # validate() refuses strategies whose backend has not landed
        raise AssertionError(cfg.parallel.strategy)
    return L.Fabric(accelerator=accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
                    strategy=strategy, precision=FABRIC_PRECISION[cfg.precision.mode])
