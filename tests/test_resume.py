"""Never lose a run: kill -9 at random moments (one mid-save), SIGTERM, sharded resume; every logged loss must
match an uninterrupted run exactly (CPU)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import FAST, REPO, dsrun, read_metrics, small_vocabulary
from tests.conftest import start as start_dsrun

STEPS = 16
JOB = [*FAST, *small_vocabulary(), f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.micro_batch=2",
       "train.seq_len=64"]


def start(args: list[str]) -> subprocess.Popen:
    return start_dsrun(*args)


def rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out")


def assert_latest_is_complete(run_dir: Path) -> None:
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        assert (run_dir / "checkpoints" / latest.read_text().strip() / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = dsrun(*JOB, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [row["loss"] for row in read_metrics(run_dir)]


def test_kill_9_five_times_then_resume_gives_identical_losses(reference, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    proc = start([*JOB, f"hydra.run.dir={run_dir}"])
    for attempt in range(5):
        if attempt == 2:  # mid-save: a checkpoint folder is being written
            target = lambda: any((run_dir / "checkpoints").glob("*.incomplete"))  # noqa: E731
        else:
            k = min(STEPS - 1, rows(run_dir) + rng.randint(1, 3))
            target = lambda k=k: rows(run_dir) >= k  # noqa: E731
        if wait_for(target, proc):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        assert_latest_is_complete(run_dir)
        proc = start(["resume", str(run_dir)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert kills >= 5
    assert [row["loss"] for row in read_metrics(run_dir)] == reference
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, STEPS + 1))


def test_sigterm_saves_exits_0_and_resume_continues(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*JOB, "train.checkpoint_every=0", f"hydra.run.dir={run_dir}"])
    assert wait_for(lambda: rows(run_dir) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stderr = proc.stderr.read()
    assert "checkpoint saved" in stderr and f"dsrun resume {run_dir}" in stderr
    stopped = int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    assert stopped == rows(run_dir) >= 5, "the checkpoint is at the interrupted step"
    resumed = dsrun("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped}" in resumed.stderr
    assert [row["loss"] for row in read_metrics(run_dir)] == reference


FSDP = [*FAST, *small_vocabulary(), "model=tiny_qwen2", "train.max_steps=6", "train.checkpoint_every=3",
        "train.seq_len=64", "parallel=fsdp", "optim=sgd", "train.lr=0.05"]


def test_fsdp_resume_same_world_size_is_identical_and_reshards_to_one_process(tmp_path):
    full = dsrun(*FSDP, "hardware.devices=2", "train.micro_batch=2", run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    reference = [row["loss"] for row in read_metrics(tmp_path / "full")]
    # stop at step 3 (SIGTERM-free: a run of 3 steps with the same schedule is the first half of the full one)
    half = tmp_path / "half"
    proc = start([*FSDP, "hardware.devices=2", "train.micro_batch=2", f"hydra.run.dir={half}"])
    assert wait_for(lambda: (half / "checkpoints" / "latest").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", str(half)], check=False)  # the other rank
    for pid, cmdline in forkserver.command_lines().items():  # ... when the test zygote forked it
        if str(half) in " ".join(cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert (half / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert (half / "checkpoints" / "step-00000003" / "state").is_dir(), "sharded (torch.distributed.checkpoint)"
    same = tmp_path / "same"
    subprocess.run(["cp", "-r", str(half), str(same)], check=True)
    again = dsrun("resume", str(same))
    assert again.returncode == 0, again.stderr[-2000:]
    assert [row["loss"] for row in read_metrics(same)] == reference
    # one process, micro-batch 4: the same global batch, the checkpoint resharded on load
    one = dsrun("resume", str(half), "hardware.devices=1", "train.micro_batch=4")
    assert one.returncode == 0, one.stderr[-2000:]
    assert [row["loss"] for row in read_metrics(half)] == pytest.approx(reference, rel=1e-5)


def test_diverging_run_skips_nonfinite_steps_stops_and_never_saves_nan(tmp_path):
    """lr 1e30 blows the weights up after one step: every later step has NaN gradients, is skipped, and after
    train.max_nonfinite_steps the run stops with one line; every checkpoint on disk holds finite weights."""
    import torch

    run_dir = tmp_path / "run"
    proc = dsrun(*FAST, "optim=sgd", "train.lr=1e30", "optim.warmup_steps=0", "train.max_steps=20",
                 "train.checkpoint_every=1", "train.max_nonfinite_steps=3", "train.seq_len=32", run_dir=run_dir)
    from tests.conftest import assert_user_error

    assert_user_error(proc, "not finite for 3 steps in a row", "lower train.lr")
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints, "steps before the divergence were checkpointed"
    for folder in checkpoints:
        state = torch.load(folder / "state", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), folder


def killed_after_first_checkpoint(job: list[str], run_dir: Path) -> Path:
    """`job` started in `run_dir` and killed with SIGKILL once its first checkpoint is on disk."""
    proc = start([*job, f"hydra.run.dir={run_dir}"])
    assert wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run_dir


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    import torch

    job = [*FAST, "adapter=lora", "train.max_steps=6", "train.checkpoint_every=3", "train.seq_len=32",
           "train.micro_batch=2"]
    full = dsrun(*job, run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = killed_after_first_checkpoint(job, tmp_path / "cut")
    state = torch.load(run_dir / "checkpoints" / "step-00000003" / "state", weights_only=True)
    assert state["model"] and all("lora_" in name for name in state["model"]), "adapters only"
    resumed = dsrun("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(tmp_path / "full")]


def test_adamw8bit_keeps_8_bit_moments_and_resumes_exactly(tmp_path):
    """optim=adamw8bit (bitsandbytes, real, on CPU): the tiny model's large tensors get uint8 moments, the run
    learns, and a run killed after its first checkpoint resumes to the same losses as one never stopped."""
    import torch

    job = [*FAST, "optim=adamw8bit", "train.max_steps=6", "train.checkpoint_every=3", "train.seq_len=32",
           "train.micro_batch=2"]
    full = dsrun(*job, run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert losses[-1] < losses[0], losses
    run_dir = killed_after_first_checkpoint(job, tmp_path / "cut")
    state = torch.load(run_dir / "checkpoints" / "step-00000003" / "state", weights_only=True)

    def tensors(value):  # bitsandbytes nests its quantized states in the optimizer's state dict
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in tensors(state["optimizer"])), "8-bit moments"
    resumed = dsrun("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in read_metrics(run_dir)] == losses
