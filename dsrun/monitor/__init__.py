"""Monitors watch a run: objects handed to the loop, which calls start / log / finish and never asks which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dsrun.monitor.base import Monitor, Monitors
from dsrun.monitor.console import ConsoleMonitor
from dsrun.monitor.health import HealthChecked
from dsrun.monitor.jsonl import JsonlMonitor


def build_monitors(cfg: Any, run_dir: Path, is_rank_zero: bool) -> Monitors:
    """The configured monitors; ranks other than 0 get none (rank 0 owns all output).

    Every one that can fail (a taken port, a missing package, a refused login) fails here, before training.
    Backends are imported only when chosen: `import wandb` alone costs seconds."""
    if not is_rank_zero:
        return Monitors([])
    chosen = cfg.monitor
    monitors: list[Monitor] = [JsonlMonitor(run_dir / "metrics.jsonl")]
    console = ConsoleMonitor() if chosen.console.enabled else None
    if console is not None:
        monitors.append(console)
    if chosen.prometheus.enabled:
        from dsrun.monitor.prometheus import PrometheusMonitor

        prom = chosen.prometheus
        monitors.append(PrometheusMonitor(run_dir.name, prom.host, prom.port, prom.linger_s))
    if chosen.tensorboard.enabled:
        from dsrun.monitor.tensorboard import TensorboardMonitor

        monitors.append(TensorboardMonitor(run_dir / "tensorboard"))
    if chosen.wandb.enabled:
        from dsrun.monitor.wandb import WandbMonitor

        monitors.append(WandbMonitor(chosen.wandb, run_dir, OmegaConf.to_container(cfg, resolve=True)))
    return HealthChecked(monitors, console.console if console is not None else None)


__all__ = ["Monitor", "Monitors", "build_monitors"]
