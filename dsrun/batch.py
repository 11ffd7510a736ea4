"""Batch and process arithmetic, the one place it is computed: the planner, the strategy, validate() and the loop
all read these (torchtitan's ParallelDims plays this part there).

global batch = micro_batch x accumulation x data-parallel size; data-parallel size = processes / tensor-parallel size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsrun.constants import AUTO
from dsrun.hardware import devices_per_node

if TYPE_CHECKING:
    from dsrun.schema import RunConfig


def world_size(cfg: RunConfig) -> int:
    return devices_per_node(cfg.hardware) * cfg.hardware.num_nodes


def data_parallel_size(cfg: RunConfig) -> int:
    # validate() refuses a tensor-parallel size other than 1 under a strategy that does not split the matmuls
    return world_size(cfg) // cfg.parallel.tensor_parallel_size


def data_parallel_rank(global_rank: int, cfg: RunConfig) -> int:
    """Ranks of one tensor-parallel group read the same data (Fabric's mesh is (data_parallel, tensor_parallel))."""
    return global_rank // (world_size(cfg) // data_parallel_size(cfg))


def preference_pairs(cfg: RunConfig) -> bool:
    """A task=dpo run, or its plan (task=plan plan.mode=dpo)."""
    return cfg.task.name == "dpo" or (cfg.task.name == "plan" and cfg.plan.mode == "dpo")


def group_rollouts(cfg: RunConfig) -> bool:
    """A task=grpo run, or its plan (task=plan plan.mode=grpo)."""
    return cfg.task.name == "grpo" or (cfg.task.name == "plan" and cfg.plan.mode == "grpo")


def sequences_per_row(cfg: RunConfig) -> int:
    """Sequences the model runs per row of a batch: task=dpo's row is a pair (chosen and rejected); task=grpo's a
    prompt with its group of completions."""
    if group_rollouts(cfg):
        if cfg.task.name == "plan":
            return cfg.plan.generations
        assert cfg.task.generations is not None  # conf/task/grpo.yaml sets it; validate() checks it
        return cfg.task.generations
    return 2 if preference_pairs(cfg) else 1


def global_batch(cfg: RunConfig) -> int:
    """Sequences per optimizer step: the one place this product is computed."""
    return cfg.train.micro_batch * cfg.train.accumulation * data_parallel_size(cfg)


def divisors(n: int) -> list[int]:
    """Largest first: the micro-batch sizes that keep a per-rank batch of n whole."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def global_batch_problem(cfg: RunConfig) -> str | None:
    """Why this config cannot hold `train.global_batch` (None when it can, or when it is unset)."""
    tr = cfg.train
    target = tr.global_batch
    if target is None or tr.micro_batch == AUTO or not isinstance(tr.micro_batch, int):
        return None  # a micro_batch that is no whole number is validate()'s to report
    per_micro_step = tr.micro_batch * data_parallel_size(cfg)
    if target < 1 or per_micro_step < 1 or target % per_micro_step:
        return (f"train.global_batch={target}: not a multiple of train.micro_batch {tr.micro_batch} x data-parallel "
                f"{data_parallel_size(cfg)} = {per_micro_step}; pick micro-batch sizes that divide it")
    return None


def auto_problem(cfg: RunConfig) -> str | None:
    """Why `train.micro_batch=auto` cannot work for this config (None when it can, or when it is not asked for)."""
    tr, hw = cfg.train, cfg.hardware
    if tr.micro_batch != AUTO:
        if isinstance(tr.micro_batch, str):
            return f"train.micro_batch={tr.micro_batch}: a number >= 1, or auto (the largest that fits)"
        return None
    if tr.global_batch is None:
        return ("train.micro_batch=auto: set train.global_batch=N, the global batch it keeps while it picks the "
                "micro-batch (e.g. train.global_batch=32)")
    if tr.global_batch < 1 or tr.global_batch % data_parallel_size(cfg):
        return (f"train.global_batch={tr.global_batch}: with train.micro_batch=auto it must be a multiple of the "
                f"data-parallel size {data_parallel_size(cfg)}")
    if hw.num_nodes > 1:
        return ("train.micro_batch=auto probes on one node: find the size with a one-node run "
                "(hardware.num_nodes=1), then set train.micro_batch=<it>")
    return None


def derive_accumulation(cfg: RunConfig) -> None:
    """accumulation = global batch / (micro-batch x data-parallel size); undividable splits are left to validate."""
    tr = cfg.train
    if tr.global_batch is not None and isinstance(tr.micro_batch, int) and global_batch_problem(cfg) is None:
        tr.accumulation = tr.global_batch // (tr.micro_batch * data_parallel_size(cfg))
