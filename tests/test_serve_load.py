"""bench/serve_load.py end to end on CPU: it starts `dsrun serve` (tiny Qwen2, random init), streams a burst of
requests through it, stops it with SIGTERM, and reports the numbers as one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("httpx", reason="bench/serve_load.py speaks HTTP with httpx")


def test_burst_through_a_started_server(tmp_path: Path):
    serve = ("model=tiny_qwen2 hardware=cpu serve.max_tokens=16 serve.max_prompt_tokens=256 "
             f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run([sys.executable, "bench/serve_load.py", "--serve", serve, "--requests", "8",
                           "--concurrency", "4", "--prompt-tokens", "32", "--max-tokens", "8", "--arrival", "burst",
                           "--json", str(tmp_path / "load.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    row = json.loads(proc.stdout)
    assert row == json.loads((tmp_path / "load.json").read_text())
    assert (row["requests"], row["ok"], row["rejected_503"], row["errors"]) == (8, 8, 0, 0), row
    assert row["tokens_per_s"] > 0 and row["ttft_ms"]["p50"] > 0, row
    assert row["completion_tokens_mean"] >= 1 and row["prompt_tokens_mean"] > 0, row
    assert row["server_exit_code"] == 0, proc.stderr
    assert "8 ok, 0 rejected (503), 0 errors" in proc.stderr
