"""Sweeps (`python -m dsrun -m a=1,2 b=x,y`): every training trial runs as its own process.

Hydra's launcher calls the task function once per trial in one process. A trial that segfaults, is killed or
OOMs would take the whole sweep with it, and Fabric's own launcher hangs under Hydra multirun (Lightning dropped
that support: lightning PRs #15689, #15737). So under
`-m` the task function starts `python -m dsrun <the trial's overrides> hydra.run.dir=<its folder>
hydra.output_subdir=null` (the same re-run Fabric uses for its ranks), waits, and records how the trial ended:

    completed | interrupted | oom | nan | refused: <bad input> | crashed: <signal or exit code>: <last error line>
    | skipped: <why>

The child records itself in the ledger when it lives to; when it dies, this process records it instead.
Plans and dry runs are cheap and cannot crash the sweep: they still run in-process.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsrun.run import ledger
from dsrun.child import run_child
from dsrun.plan import plan
from dsrun.run.files import rank_zero
from dsrun.task_table import RUNNABLE_TASKS

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

ERROR_LINE = re.compile(r"error|exception|fatal|segmentation|killed|abort", re.IGNORECASE)


def isolated(cfg: RunConfig) -> bool:
    """True inside a multirun job that trains: run it as a child process instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and cfg.task.name in RUNNABLE_TASKS


def run_trial(cfg: RunConfig) -> dict[str, Any]:
    """The task function of a sweep job: plan-check, run the child, classify, record, print one line."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    label = f"trial {hc.job.num} ({' '.join(hc.overrides.task)})"
    reason = skip_reason(cfg)
    if reason is not None:
        record = ledger.record_run(job_dir, {"status": f"skipped: {reason}"}, cfg) if rank_zero() else {}
    else:
        main = next(s for s in hc.runtime.config_sources if s.provider == "main")
        config_path = main.path if main.schema == "file" else f"{main.schema}://{main.path}"
        argv = [sys.executable, "-m", "dsrun", "--config-path", config_path, "--config-name", hc.job.config_name or "config",
                *hc.overrides.task, f"hydra.run.dir={job_dir}", "hydra.output_subdir=null"]
        for stale in ("record.json", "summary.json"):  # a sweep folder used again must not report the old trial
            (job_dir / stale).unlink(missing_ok=True)
        returncode, stopped_by = run_child(argv, job_dir / "trial.log")
        record = outcome(job_dir, cfg, returncode) if rank_zero() else {}
        if stopped_by:  # the user (or SLURM) stopped the sweep: start no more trials
            from dsrun.run.checkpoint import last_checkpoint_note  # (torch) what the trial left, read from the disk

            raise SystemExit(f"dsrun: sweep stopped by {stopped_by} during {label}; {last_checkpoint_note(job_dir)}; "
                             f"the trial can be continued with: dsrun resume {job_dir}")
    if record:
        print(f"dsrun: {label}: {record['status']}", file=sys.stderr, flush=True)
    return record


def outcome(job_dir: Path, cfg: RunConfig, returncode: int) -> dict[str, Any]:
    """The trial's record: its own when it wrote one, else built here from its exit and its log."""
    log = (job_dir / "trial.log").read_text(errors="replace") if (job_dir / "trial.log").is_file() else ""
    own = _read_json(job_dir / "record.json")
    if own is not None:
        # one rank's OOM kills the others; rank 0 then records whatever error reached it
        if own["status"].startswith("crashed") and _oom(log):
            ledger.amend_status(own, "oom")
        return own
    summary = _read_json(job_dir / "summary.json") or {}
    status = ledger.status_of_summary(summary) if returncode == 0 and summary else exit_status(returncode, log)
    return ledger.record_run(job_dir, {**summary, "status": status}, cfg)


def exit_status(returncode: int, log: str) -> str:
    """Classify a trial that left no record: it died without reaching the end of its task."""
    if returncode == 0:
        return "completed"
    if _oom(log):
        return "oom"
    if returncode < 0:
        try:
            what = signal.Signals(-returncode).name
        except ValueError:
            what = f"signal {-returncode}"
    else:
        what = f"exit {returncode}"
    line = last_error_line(log)
    if returncode == 2 and line.startswith("dsrun: error:"):  # the trial refused bad input: it crashed nothing
        return f"refused: {line.removeprefix('dsrun: error:').strip()}"
    return f"crashed: {what}" + (f": {line}" if line else "")


def last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ERROR_LINE.search(ln)]
    return errors[-1][:200] if errors else ""


def _oom(log: str) -> bool:
    return any(marker in log for marker in ledger.OOM_MARKERS)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def skip_reason(cfg: RunConfig) -> str | None:
    """A GPU trial the planner says cannot fit is not started (it would only OOM; tasks.check_plan would refuse
    it anyway, after a process start). On CPU nothing is skipped; `train.force=true` starts it anyway."""
    if cfg.hardware.accelerator != "cuda" or cfg.train.force or cfg.hardware.gpu is None:
        return None
    p = plan(cfg)
    return None if p.fits else p.verdict
