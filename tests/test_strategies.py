"""Parallel strategies train the same model: single, ddp, fsdp (FSDP2) and tp give the same losses and gradient
norms at the same global batch (SGD: AdamW would hide a gradient summed instead of averaged); a dying rank takes
the whole job down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, read_metrics, dsrun

STEPS = 20
PARITY = [*FAST, "model=tiny_qwen2", "optim=sgd", f"train.max_steps={STEPS}", "optim.warmup_steps=2",
          "train.lr=0.05", "train.seq_len=64"]
# (processes, micro-batch per process): global batch 4 in every case; tp's two ranks read the same data.
LAYOUTS = {
    "single": ["train.micro_batch=4"],
    "ddp": ["parallel=ddp", "hardware.devices=2", "train.micro_batch=2"],
    "fsdp": ["parallel=fsdp", "hardware.devices=2", "train.micro_batch=2"],
    "tp": ["parallel=tp", "hardware.devices=2", "parallel.tensor_parallel_size=2", "train.micro_batch=4"],
}


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("parity")
    procs = {name: dsrun(*PARITY, *extra, run_dir=root / name) for name, extra in LAYOUTS.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {name: read_metrics(root / name) for name in LAYOUTS}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_strategy_matches_single_process_at_every_step(parity_runs, strategy):
    reference, got = parity_runs["single"], parity_runs[strategy]
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for ref, row in zip(reference, got):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4), (strategy, row["step"])
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (strategy, row["step"])
    assert got[-1]["loss"] < got[0]["loss"], "it learns"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def two_rank_job(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A long 2-process DDP job, once it is training: (the launching rank-0 process, the pid of rank 1)."""
    cmd = [sys.executable, "-m", "dsrun", *FAST, "parallel=ddp", "hardware.devices=2", "train.micro_batch=1",
           "train.max_steps=100000", *extra, f"hydra.run.dir={run_dir}"]
    main = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
        if main.poll() is not None or time.time() > deadline:
            main.kill()
            raise AssertionError("training never started")
        time.sleep(0.5)
    ranks = [pid for pid in _children(main.pid) if b"dsrun" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(ranks) == 1, ranks
    return main, ranks[0]


def end(main: subprocess.Popen) -> None:
    for pid in _children(main.pid):
        os.kill(pid, signal.SIGKILL)
    if main.poll() is None:
        main.kill()


def test_a_dying_rank_takes_the_job_down_within_60s(tmp_path):
    main, rank1 = two_rank_job(tmp_path / "run")
    try:
        os.kill(rank1, signal.SIGKILL)
        killed = time.time()
        assert main.wait(timeout=60) != 0
        assert time.time() - killed < 60
    finally:
        end(main)


def test_fsdp_with_activation_checkpointing_matches_without(tmp_path):
    base = [*PARITY, "train.max_steps=3", *LAYOUTS["fsdp"]]
    plain = dsrun(*base, run_dir=tmp_path / "plain")
    checkpointed = dsrun(*base, "parallel.activation_checkpointing=true", run_dir=tmp_path / "ac")
    assert plain.returncode == 0 and checkpointed.returncode == 0, checkpointed.stderr[-2000:]
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ac")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_hung_rank_times_out_naming_the_rank(tmp_path):
    """SIGSTOP one rank: the other's collective gives up after parallel.timeout_s, names its rank, exits 4, and
    takes the hung rank down with it."""
    main, rank1 = two_rank_job(tmp_path / "run", "parallel.timeout_s=10")
    try:
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.time()
        assert main.wait(timeout=90) == 4
        assert time.time() - stopped < 60
        stderr = main.stderr.read()
        assert "rank 0: a collective did not complete within parallel.timeout_s=10 s" in stderr, stderr[-2000:]
        time.sleep(0.5)
        assert not Path(f"/proc/{rank1}").exists() or b" Z " in Path(f"/proc/{rank1}/stat").read_bytes()[:80]
    finally:
        end(main)
