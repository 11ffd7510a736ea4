"""The config at the start of a run, folded: one line of the options chosen per group and one of the overrides.
The whole tree is 140 lines a newcomer scrolls past at every start; `task=dry_run` and `-v` print it, and every run
folder keeps it (config.yaml)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dsrun.constants import VERB_OVERRIDES

if TYPE_CHECKING:
    from omegaconf import DictConfig

GROUPS = ("recipe", "hardware", "parallel", "precision", "quant", "adapter", "model", "data", "optim", "task",
          "monitor")
RESOLVED = {"hardware": "hardware.name", "parallel": "parallel.name", "precision": "precision.mode"}  # `auto` ->


def folded_config(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return "dsrun: config: task=dry_run prints it"
    hc = HydraConfig.get()
    parts = []
    # `dsrun resume|replay` compose from a run's snapshot, where the groups are already keys: each group's name
    snapshot = not any(hc.runtime.choices.get(group) for group in GROUPS)
    for group in GROUPS:
        choice = OmegaConf.select(cfg, f"{group}.name") if snapshot else hc.runtime.choices.get(group)
        if choice is None or not isinstance(choice, str):
            continue
        if choice == "auto" and group in RESOLVED:
            choice = f"auto ({OmegaConf.select(cfg, RESOLVED[group])})"
        parts.append(f"{group}={choice}")
    overrides = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in GROUPS]
    for added in filter(None, os.environ.get(VERB_OVERRIDES, "").split("\n")):  # the verb's, not the user's
        if added in overrides:
            overrides.remove(added)
    line = f"dsrun: config: {' '.join(parts)}" + (" (the run's snapshot)" if snapshot else "")
    if overrides:
        line += f"\ndsrun: overrides: {' '.join(overrides)}"
    return line + f"\ndsrun: every key: {hc.runtime.output_dir}/config.yaml (-v or task=dry_run prints them)"
