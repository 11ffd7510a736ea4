"""Monitors watch a run: objects handed to the loop, which calls start / log / finish and never asks which."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsrun.monitor.base import Monitor, Monitors
from dsrun.monitor.console import ConsoleMonitor
from dsrun.monitor.health import HealthChecked
from dsrun.monitor.jsonl import JsonlMonitor
from dsrun.monitor.wandb import WandbMonitor, WandbSettings


@dataclass
class ConsoleSettings:
    enabled: bool = True  # the progress bar and summary stay beside any other monitor; monitor=none turns them off


def _console(settings: ConsoleSettings, run_dir: Path, config: dict[str, Any]) -> Monitor:
    return ConsoleMonitor()


@dataclass
class PrometheusSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9400  # 0 picks a free port and prints it
    linger_s: float = 0.0  # keep /metrics up this long after training, so a short job's last values get scraped


def _prometheus(settings: PrometheusSettings, run_dir: Path, config: dict[str, Any]) -> Monitor:
    from dsrun.monitor.prometheus import PrometheusMonitor

    return PrometheusMonitor(run_dir.name, settings.host, settings.port, settings.linger_s)


@dataclass
class TensorboardSettings:
    enabled: bool = False


def _tensorboard(settings: TensorboardSettings, run_dir: Path, config: dict[str, Any]) -> Monitor:
    from dsrun.monitor.tensorboard import TensorboardMonitor

    return TensorboardMonitor(run_dir / "tensorboard")


def _wandb(settings: WandbSettings, run_dir: Path, config: dict[str, Any]) -> Monitor:
    return WandbMonitor(settings, run_dir, config)  # `import wandb` (seconds) happens inside, when chosen


@dataclass(frozen=True)
class MonitorEntry:
    # (its settings block, the run folder, the resolved run config as plain data) -> the monitor
    build: Callable[[Any, Path, dict[str, Any]], Monitor]
    settings: type  # its monitor.<name> block in the schema (config.MonitorConfig is made from these)


# The monitor registry: name -> builder and settings, each turned on by monitor.<name>.enabled. Adding a monitor:
# its conf/monitor/<name>.yaml and one entry here (a settings class and a builder). The JSONL log is always on.
MONITORS: dict[str, MonitorEntry] = {"console": MonitorEntry(_console, ConsoleSettings),
                                     "prometheus": MonitorEntry(_prometheus, PrometheusSettings),
                                     "tensorboard": MonitorEntry(_tensorboard, TensorboardSettings),
                                     "wandb": MonitorEntry(_wandb, WandbSettings)}


def build_monitors(settings: Any, config: dict[str, Any], run_dir: Path, is_rank_zero: bool) -> Monitors:
    """The monitors `settings` (the run's `monitor` block: a class made from MONITORS at import, so no static type)
    turns on; ranks other than 0 get none (rank 0 owns all output). `config`: the resolved run config as plain
    data, for backends that record it.

    Every one that can fail (a taken port, a missing package, a refused login) fails here, before training.
    Backends are imported only when chosen: `import wandb` alone costs seconds."""
    if not is_rank_zero:
        return Monitors([])
    monitors: list[Monitor] = [JsonlMonitor(run_dir / "metrics.jsonl")]
    monitors += [entry.build(getattr(settings, name), run_dir, config) for name, entry in MONITORS.items()
                 if getattr(settings, name).enabled]
    console = next((m for m in monitors if isinstance(m, ConsoleMonitor)), None)
    return HealthChecked(monitors, console.console if console is not None else None)


__all__ = ["Monitor", "Monitors", "build_monitors"]
