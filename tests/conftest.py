"""Shared test helpers: run dsrun for real, as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# every run appends to the run ledger: keep the tests' rows out of the repository's outputs/ledger.sqlite
os.environ.setdefault("DSRUN_LEDGER", str(Path(tempfile.mkdtemp(prefix="dsrun-ledger-")) / "ledger.sqlite"))
# Short CPU runs of the tiny model: enough steps to see learning, few enough for a 2-core CI box. No checkpoints
# unless a test asks for them (a later override wins): the 200 MB write + fsync is a third of a short run.
FAST = ["hardware=cpu", "monitor=none", "train.log_every=1", "train.checkpoint_every=-1"]


def dsrun(*args: str, run_dir: Path | None = None, timeout: float = 300, env: dict | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dsrun args...` with the run folder pinned (hydra.run.dir) so tests find it."""
    cmd = [sys.executable, "-m", "dsrun", *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit 2, 'dsrun: error:' lines (other stderr lines only dsrun's own progress notes), no
    traceback, and the message names what to fix."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(ln.startswith("dsrun: error:") for ln in lines), proc.stderr
    assert all(ln.startswith("dsrun: ") for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in {proc.stderr!r}"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
