"""Filling `auto`: hardware detection, precision, MoE kernels, fine-tuning defaults, the derived accumulation and the
planner's guess for `train.micro_batch=auto`. It sits above the schema (dsrun/config.py) and the planner
(dsrun/plan/), which it both uses; validate() then checks the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsrun.batch import auto_problem, derive_accumulation
from dsrun.batch_size import planned_micro_batch
from dsrun.config import DEFAULT_MAX_STEPS
from dsrun.constants import AUTO
from dsrun.data import tokenizer_choice
from dsrun.errors import ConfigError
from dsrun import hardware
from dsrun.hardware import gpu_catalog
from dsrun.precision import PRECISIONS

if TYPE_CHECKING:
    from dsrun.schema import RunConfig


def resolve(cfg: RunConfig) -> None:
    """Fill the `auto` choices in place (hardware detection, precision, MoE kernels) so the run folder records
    what really ran. Called once, before validate()."""
    finetune = cfg.model.finetune  # the model option's fine-tuning defaults, where the user set nothing
    if cfg.train.lr is None:
        cfg.train.lr = finetune.lora_lr if cfg.adapter.method != "none" else finetune.lr
    if cfg.train.seq_len is None:
        cfg.train.seq_len = finetune.seq_len
    hw = cfg.hardware
    if hw.accelerator == "auto":
        found = hardware.detect()  # a module attribute: tests put a 2-GPU box in its place
        hw.accelerator, hw.gpu = found["accelerator"], found["gpu"]
        if hw.devices is None:  # "every GPU": a number the user gave is kept as given, 1 included
            hw.devices = found["devices"]
    if hw.devices is None:
        raise ConfigError([f"hardware.devices=null means every GPU this machine has, which only hardware=auto "
                           f"detects; give hardware={hw.name} a number of devices"])
    if cfg.parallel.strategy == "auto":
        many = hw.devices * hw.num_nodes > 1
        cfg.parallel.strategy = cfg.parallel.name = "ddp" if many else "single"
    if cfg.precision.mode == "auto":
        gpu = gpu_catalog().get(hw.gpu or "", {})
        cfg.precision.mode = "bf16-mixed" if hw.accelerator == "cuda" and gpu.get("bf16", True) else "32-true"
    cfg.model.tokenizer = tokenizer_choice(cfg.model)  # auto: model.path's own tokenizer, else DeepSeek's
    if cfg.model.experts_implementation is None:
        # transformers' grouped_mm experts kernel is bf16-only and CUDA-fast; eager runs everywhere
        precision = PRECISIONS[cfg.precision.mode]
        bf16 = precision.compute == "bfloat16" and not precision.fp8
        cfg.model.experts_implementation = "grouped_mm" if hw.accelerator == "cuda" and bf16 else "eager"
    if cfg.train.micro_batch == AUTO and auto_problem(cfg) is None:  # after parallel (data-parallel size)
        cfg.train.micro_batch = planned_micro_batch(cfg)  # the probe before training may still change it
    derive_accumulation(cfg)
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        cfg.train.max_steps = DEFAULT_MAX_STEPS
