from __future__ import annotations

from typing import Any


class Monitor:
    """One way of watching a run. `info` at start holds the plan of the run (steps, batch, model size, ...);
    `metrics` per log step hold at least step, loss, lr, grad_norm, tokens_per_s; `summary` is summary.json."""

    def start(self, info: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class Monitors(Monitor):
    def __init__(self, monitors: list[Monitor]):
        self.monitors = monitors

    def start(self, info: dict[str, Any]) -> None:
        for m in self.monitors:
            m.start(info)

    def log(self, metrics: dict[str, Any]) -> None:
        for m in self.monitors:
            m.log(metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        for m in self.monitors:
            m.finish(summary)
