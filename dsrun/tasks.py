"""Tasks a composed config can run (`task=<name>`); the Hydra entry point calls run_task()."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.tree import Tree
from omegaconf import DictConfig, OmegaConf

from dsrun.plan_report import plan_task
from dsrun.runs import run_dir
from dsrun.strategy import check_environment, data_parallel_size, global_batch


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("[bold]dsrun config")
    for group, node in cfg.items():
        branch = tree.add(f"[bold cyan]{group}")
        branch.add(OmegaConf.to_yaml(node, resolve=True).rstrip() if OmegaConf.is_config(node) else str(node))
    return tree


def is_rank_zero() -> bool:
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def dry_run(cfg: DictConfig) -> None:
    console = Console()
    console.print(config_tree(cfg))
    tr = cfg.train
    console.print(f"global batch {global_batch(cfg)} = micro_batch {tr.micro_batch} x accumulation {tr.accumulation} "
                  f"x data-parallel {data_parallel_size(cfg)}; {global_batch(cfg) * tr.seq_len:,} tokens per step")
    console.print("config valid; nothing started (task=dry_run)")


def train(cfg: DictConfig) -> None:
    from dsrun.train import fit

    check_environment(cfg)
    if is_rank_zero() and cfg.monitor.console.enabled:
        Console(stderr=True).print(config_tree(cfg))
    fit(cfg, run_dir())


TASKS = {"dry_run": dry_run, "train": train, "plan": plan_task}  # plan_task: no check_environment, no GPU


def run_task(cfg: DictConfig) -> Any:
    return TASKS[cfg.task.name](cfg)
