"""The speed benchmark's entry runs on CPU at the tiny shape and prints its table (its GPU figures live in
BENCHMARKS.md, measured through the device tool): no timed assertions, only that the plain loop and dsrun's step
trained the same model on the same batches to the same loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny"])  # dense, and the MoE case (MLA + routed experts) of issue #30
def test_speed_bench_runs_on_cpu_and_both_loops_reach_the_same_loss(tmp_path, model):
    proc = subprocess.run([sys.executable, "bench/speed.py", "--device", "cpu", "--model", model, "--batch",
                           "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--cases", "plain,dsrun"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={"OUT": str(tmp_path),
                                                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | tokens/s | vs plain eager |" in proc.stdout and "| dsrun |" in proc.stdout, proc.stdout
    results = {r["case"]: r for r in json.loads((tmp_path / "speed.json").read_text())["results"]}
    assert len(results["dsrun"]["windows_tokens_per_s"]) == 3
    assert abs(results["dsrun"]["loss"] - results["plain"]["loss"]) < 1e-3, results
