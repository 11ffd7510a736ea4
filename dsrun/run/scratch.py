"""Tasks that keep nothing leave no run folder: `task=dry_run`, a single `task=plan`, `generate` and `serve` print
or answer what they do, and an empty timestamped folder per look would bury the runs in outputs/runs/ (15 of one
user's 40 folders).

A folder the user named (hydra.run.dir=...) stays, and so do a sweep's trial folders (each holds its plan.json).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsrun.task_table import SCRATCH_TASKS

# The run folder dsrun chose itself (the timestamped default), pinned on the command line by the pre-check: not a
# folder the user named, so a plan or dry run may still leave nothing behind
SCRATCH_RUN_DIR = "DSRUN_SCRATCH_RUN_DIR"


def discard_scratch_folder(task: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if task not in SCRATCH_TASKS or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    named = any(o.lstrip("+").startswith("hydra.run.dir=") for o in hc.overrides.hydra) and \
        os.environ.get(SCRATCH_RUN_DIR) != str(Path(hc.runtime.output_dir).absolute())
    if hc.mode != RunMode.RUN or named:
        return
    shutil.rmtree(hc.runtime.output_dir, ignore_errors=True)
