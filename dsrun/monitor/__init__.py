"""Monitors watch a run: objects handed to the loop, which calls start / log / finish and never asks which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsrun.monitor.base import Monitor, Monitors
from dsrun.monitor.console import ConsoleMonitor
from dsrun.monitor.jsonl import JsonlMonitor


def build_monitors(cfg: Any, run_dir: Path, is_rank_zero: bool) -> Monitors:
    """The configured monitors; ranks other than 0 get none (rank 0 owns all output)."""
    if not is_rank_zero:
        return Monitors([])
    monitors: list[Monitor] = [JsonlMonitor(run_dir / "metrics.jsonl")]
    if cfg.monitor.console.enabled:
        monitors.append(ConsoleMonitor())
    return Monitors(monitors)


__all__ = ["Monitor", "Monitors", "build_monitors"]
