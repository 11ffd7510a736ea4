"""Monitors watch a run: objects handed to the loop, which calls start / log / finish and never asks which."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from dsrun.monitor.base import Monitor, Monitors
from dsrun.monitor.console import ConsoleMonitor
from dsrun.monitor.health import HealthChecked
from dsrun.monitor.jsonl import JsonlMonitor


def _console(cfg: Any, run_dir: Path) -> Monitor:
    return ConsoleMonitor()


def _prometheus(cfg: Any, run_dir: Path) -> Monitor:
    from dsrun.monitor.prometheus import PrometheusMonitor

    prom = cfg.monitor.prometheus
    return PrometheusMonitor(run_dir.name, prom.host, prom.port, prom.linger_s)


def _tensorboard(cfg: Any, run_dir: Path) -> Monitor:
    from dsrun.monitor.tensorboard import TensorboardMonitor

    return TensorboardMonitor(run_dir / "tensorboard")


def _wandb(cfg: Any, run_dir: Path) -> Monitor:
    from dsrun.monitor.wandb import WandbMonitor

    return WandbMonitor(cfg.monitor.wandb, run_dir, OmegaConf.to_container(cfg, resolve=True))


# The monitor registry: name -> builder, each turned on by monitor.<name>.enabled. Adding a monitor: its
# conf/monitor/<name>.yaml, its settings in config.MonitorConfig, and one entry here. The JSONL log is always on.
MONITORS: dict[str, Callable[[Any, Path], Monitor]] = {"console": _console, "prometheus": _prometheus,
                                                       "tensorboard": _tensorboard, "wandb": _wandb}


def build_monitors(cfg: Any, run_dir: Path, is_rank_zero: bool) -> Monitors:
    """The configured monitors; ranks other than 0 get none (rank 0 owns all output).

    Every one that can fail (a taken port, a missing package, a refused login) fails here, before training.
    Backends are imported only when chosen: `import wandb` alone costs seconds."""
    if not is_rank_zero:
        return Monitors([])
    monitors: list[Monitor] = [JsonlMonitor(run_dir / "metrics.jsonl")]
    monitors += [build(cfg, run_dir) for name, build in MONITORS.items() if cfg.monitor[name].enabled]
    console = next((m for m in monitors if isinstance(m, ConsoleMonitor)), None)
    return HealthChecked(monitors, console.console if console is not None else None)


__all__ = ["Monitor", "Monitors", "build_monitors"]
