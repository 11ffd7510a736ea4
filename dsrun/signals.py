"""SIGINT and SIGTERM from the process's first instruction (dsrun/cli.py installs this before its heavy imports).

While dsrun is still importing and checking (before the task's libraries are loaded) a signal ends the process at
once with one line: raising into the middle of an import leaves torch half-initialised (a traceback from the next
import, once a SIGSEGV), and nothing has been trained or saved yet. Once `started()` is called, a signal raises
`Interrupted` instead, so the run can record how it ended (the training loop installs its own handlers on top)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_importing = [True]
_received: list[int] = []


def install() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handle)


def started() -> None:
    """The task's libraries are loaded: from here a signal raises `Interrupted` where the process is."""
    _importing[0] = False


def received() -> int | None:
    """The signal that was raised as `Interrupted`, if one was: libraries that wrap exceptions (transformers'
    lazy imports re-raise them as their own) hide it from an `except Interrupted`."""
    return _received[-1] if _received else None


def _handle(signum: int, frame: Any) -> None:
    if _importing[0]:
        sys.stderr.write(f"dsrun: stopped by {signal.Signals(signum).name} during start-up; nothing was trained or "
                         "saved\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    from dsrun.errors import Interrupted

    _received.append(signum)
    raise Interrupted(signum)
