from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsrun.monitor.base import Monitor


class JsonlMonitor(Monitor):
    """metrics.jsonl: one JSON object per logged step, flushed as written so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.path = path

    def start(self, info: dict[str, Any]) -> None:
        self.handle = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any]) -> None:
        self.handle.write(json.dumps(metrics) + "\n")
        self.handle.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        self.handle.close()
