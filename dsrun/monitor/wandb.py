"""Weights & Biases on rank 0: offline by default, into <run>/wandb; `wandb sync` uploads a folder later.

The API key is wandb's business: it reads WANDB_API_KEY or its netrc itself, and nothing of the environment goes
into the logged config (the resolved dsrun config holds no secrets).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, cast

from dsrun.errors import UserError
from dsrun.monitor.base import Monitor


@dataclass
class WandbSettings:
    enabled: bool = False
    mode: str = "offline"  # offline | online | disabled
    project: str = "dsrun"
    entity: Optional[str] = None
    group: Optional[str] = None


class WandbMonitor(Monitor):
    """One W&B run per dsrun run, named after the run folder; opened at construction so that a missing package or
    a refused login stops the job before training."""

    def __init__(self, cfg: WandbSettings, run_dir: Path, config: dict[str, Any]):  # config: the resolved run config
        try:
            import wandb
        except ImportError as exc:
            raise UserError(f"monitor=wandb: the wandb package cannot be imported ({exc}); install it with "
                            "`pip install wandb`, or leave wandb out of monitor=") from None
        self.mode = cfg.mode
        try:
            group = cfg.group or os.environ.get("DSRUN_SWEEP")  # a sweep's trials are grouped by the sweep
            mode = cast(Literal["online", "offline", "disabled"], cfg.mode)  # one of these: validate() checks it
            self.run = wandb.init(dir=run_dir, mode=mode, project=cfg.project, entity=cfg.entity, group=group,
                                  name=run_dir.name, job_type="train", config=config,
                                  settings=wandb.Settings(silent=True))  # dsrun prints its own line
        except wandb.errors.Error as exc:
            reason = " ".join(str(exc).split())
            raise UserError(f"monitor.wandb.mode={cfg.mode}: {reason}; set WANDB_API_KEY or run `wandb login`, "
                            "or use monitor.wandb.mode=offline and `wandb sync` later") from None

    def start(self, info: dict[str, Any]) -> None:
        self.run.config.update({"run_info": info})

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=metrics["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        folder = Path(self.run.dir).parent  # run.dir is <run>/wandb/offline-run-*/files
        self.run.summary.update(summary)
        self.run.finish()
        if self.mode == "offline":
            print(f"dsrun: wandb offline run in {folder}; upload it with `wandb sync {folder}`", file=sys.stderr)
