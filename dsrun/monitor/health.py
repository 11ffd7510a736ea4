"""Training health: non-finite and spiking loss / gradient norm, flagged in every metrics row.

The flags go into the row itself, so metrics.jsonl, W&B, TensorBoard and Prometheus all carry them, and the
console prints one warning line when one is raised.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape

from dsrun.monitor.base import Monitor, Monitors

# watched key -> spike factor over its moving average (gradient norms swing far more than the loss does)
WATCHED = {"loss": 2.0, "grad_norm": 5.0}
WARMUP = 5  # log steps before spikes count: early training moves too fast for an average to mean anything
ALPHA = 0.1  # moving-average weight of the newest value: about the last 20 log steps
FLAGS = tuple(f"{key}_{kind}" for key in WATCHED for kind in ("nonfinite", "spike"))


class Health:
    """Moving averages of the watched keys; `check` flags one metrics row against them."""

    def __init__(self) -> None:
        self.average: dict[str, float] = {}
        self.seen: dict[str, int] = {}

    def check(self, metrics: dict[str, Any]) -> tuple[dict[str, bool], list[str]]:
        """The flags of this row and a warning per raised flag."""
        flags: dict[str, bool] = {}
        warnings: list[str] = []
        for key, factor in WATCHED.items():
            value = metrics.get(key)
            if value is None:
                continue
            average, seen = self.average.get(key), self.seen.get(key, 0)
            flags[f"{key}_nonfinite"] = not math.isfinite(value)
            flags[f"{key}_spike"] = (math.isfinite(value) and average is not None and seen >= WARMUP
                                     and value > factor * average)
            step = metrics.get("step")
            if flags[f"{key}_nonfinite"]:
                warnings.append(f"step {step}: {key} is {value}; the run is diverging (lower train.lr, "
                                "check precision and data)")
            elif flags[f"{key}_spike"]:
                warnings.append(f"step {step}: {key} spike, {value:.4g} is {value / average:.1f}x its moving "
                                f"average {average:.4g}")
            if math.isfinite(value):  # a spike is folded in too: a lasting jump must stop warning eventually
                self.average[key] = value if average is None else (1 - ALPHA) * average + ALPHA * value
                self.seen[key] = seen + 1
        return flags, warnings


class HealthChecked(Monitors):
    """The monitors, each handed the metrics row with the health flags added; warnings go to `console`."""

    def __init__(self, monitors: list[Monitor], console: Console | None = None):
        super().__init__(monitors)
        self.health = Health()
        self.console = console

    def log(self, metrics: dict[str, Any]) -> None:
        flags, warnings = self.health.check(metrics)
        if self.console is not None:
            for warning in warnings:
                self.console.print(f"[bold yellow]dsrun: warning:[/] {escape(warning)}", soft_wrap=True)
        super().log({**metrics, **flags})
