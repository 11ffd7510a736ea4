"""A dsrun process started from another one (a sweep trial, a micro-batch probe), with the signals that stop the
parent passed on to it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def run_child(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the trial with its output in `log`. SIGTERM/SIGINT are passed on, so the trial checkpoints and exits
    as a single run would; returns (exit code, the signal that stopped the sweep or '')."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stopped_by = ""
    with open(log, "w") as out:
        # the sweep's name reaches W&B (group) through the environment, so the trial's config stays the sweep's
        extra = env if env is not None else {"DSRUN_SWEEP": log.parent.parent.name}
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **extra})

        def forward(signum: int, frame: Any) -> None:
            nonlocal stopped_by
            stopped_by = signal.Signals(signum).name
            child.send_signal(signum)

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread (some launchers): no forwarding, the trial still runs
            pass
        try:
            returncode = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return returncode, stopped_by
