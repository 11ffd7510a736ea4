"""TensorBoard event files in <run>/tensorboard: every numeric metric as a scalar under train/ (eval_* under eval/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsrun.errors import UserError
from dsrun.monitor.base import Monitor


class TensorboardMonitor(Monitor):
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(f"monitor=tensorboard: {exc}; install it with `pip install tensorboard`, "
                            "or leave tensorboard out of monitor=") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):  # bools are ints: health flags plot as 0/1
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, value, metrics["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.close()
