"""Parallel strategies train the same model: single, ddp, fsdp (FSDP2) and tp give the same losses and gradient
norms at the same global batch (SGD: AdamW would hide a gradient summed instead of averaged); a dying rank takes
the whole job down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, dsrun, read_metrics, small_vocabulary, start

STEPS = 10
PARITY = [*FAST, *small_vocabulary(), "model=tiny_qwen2", "optim=sgd", f"train.max_steps={STEPS}",
          "optim.warmup_steps=2", "train.lr=0.05", "train.seq_len=64"]
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


# rank 1 a plain child of rank 0 (not forked by the test zygote): found by its parent pid, as dsrun's collective
# timeout finds the ranks it must end
PLAIN_RANKS = {"DSRUN_TEST_FORK_CHILDREN": "0"}


def two_rank_job(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A long 2-process DDP job, once it is training: (the launching rank-0 process, the pid of rank 1)."""
    main = start(*FAST, "parallel=ddp", "hardware.devices=2", "train.micro_batch=1", "train.max_steps=100000",
                 *extra, f"hydra.run.dir={run_dir}", env=PLAIN_RANKS)
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


def test_fsdp_reduces_gradients_in_bf16_when_asked(tmp_path):
    """parallel.reduce_dtype=bf16 reaches FSDP2's policy: the same run, gradients reduce-scattered in bf16 instead of
    fp32, has gradient norms that differ by bf16 rounding only (a key that did nothing would give equal norms)."""
    base = [*PARITY, "train.max_steps=3", "train.log_every=1", "precision=bf16", *LAYOUTS["fsdp"]]
    for dtype in ("fp32", "bf16"):
        proc = dsrun(*base, f"parallel.reduce_dtype={dtype}", run_dir=tmp_path / dtype)
        assert proc.returncode == 0, proc.stderr[-2000:]
    fp32, bf16 = (read_metrics(tmp_path / dtype) for dtype in ("fp32", "bf16"))
    gaps = [abs(b["grad_norm"] - a["grad_norm"]) / a["grad_norm"] for a, b in zip(fp32, bf16)]
    assert any(gap > 0 for gap in gaps) and max(gaps) < 2e-2, gaps
    assert [b["loss"] for b in bf16] == pytest.approx([a["loss"] for a in fp32], rel=1e-2)


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


ENDING_RANKS = r'''
import os, subprocess, sys, time
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from dsrun.tasks import end_launched_ranks

rank1 = subprocess.Popen(["sleep", "100"])
_ChildProcessObserver(os.getpid(), [rank1], sleep_period=0.05).start()  # Fabric's, polling every 50 ms
time.sleep(0.3)
end_launched_ranks()
time.sleep(1)  # what the exit still does (the run's record, atexit) takes this long under load
sys.exit(4)
'''


def test_ending_the_ranks_does_not_get_this_process_killed():
    """CI once saw the hung-rank job exit -9 instead of 4: the rank it had SIGKILLed was polled by Lightning's child
    observer, which then SIGKILLed the launching process before it exited."""
    proc = subprocess.run([sys.executable, "-c", ENDING_RANKS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]


DEEPSPEED_STEP = r'''
import copy, json, os, sys
from types import SimpleNamespace
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import importlib
import deepspeed
from lightning.fabric.strategies import DeepSpeedStrategy
from omegaconf import OmegaConf
from dsrun.strategy import deepspeed_config, micro_step, optimizer_step

# DeepSpeed compiles a C++ op (~35 s on a fresh machine) for shared-memory all-reduce between CPU ranks; this job
# has one rank, and dsrun runs DeepSpeed on CUDA only (on a CPU it stops with one line)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # the module: deepspeed.comm.torch is torch
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
data = [torch.randn(8, 32) for _ in range(3)]
out = {}
for stage, offload in ((2, False), (3, False), (3, True)):
    for accumulation in (1, 2):
        cfg = OmegaConf.create({"parallel": {"zero_stage": stage, "offload": offload}, "precision": {"mode": "32-true",
                                "default_grad_clip": 1.0}, "optim": {"grad_clip": None},
                                "train": {"micro_batch": 8 // accumulation, "accumulation": accumulation}})
        model = copy.deepcopy(base)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                          config=deepspeed_config(cfg))
        strategy = DeepSpeedStrategy(config=deepspeed_config(cfg))
        strategy._deepspeed_engine = engine  # what Fabric's setup leaves there
        fabric = SimpleNamespace(strategy=strategy, device=torch.device("cpu"),
                                 backward=lambda loss, **kw: engine.backward(loss, **kw))
        norms = []
        for x in data:
            for i, part in enumerate(x.chunk(accumulation)):  # the loop's micro-steps: loss / accumulation
                with micro_step(fabric, engine, accumulating=i < accumulation - 1) as backward:
                    backward(engine(part).pow(2).mean() / accumulation)
            norm, stepped = optimizer_step(fabric, engine.optimizer, None, 1.0)
            norms.append([float(norm), bool(stepped)])
        out[f"{stage}{'o' if offload else ''}/{accumulation}"] = norms
print(json.dumps(out))
'''


def test_deepspeed_steps_its_engine_and_accumulates_like_one_big_batch(tmp_path):
    """Fabric's optimizer wrapper stepped the ZeRO optimizer beneath the engine: the engine never recorded the norm
    (every step looked non-finite) and DeepSpeed divided the loss by the accumulation a second time. A real ZeRO-2/3
    (and offload) engine on CPU: norms finite, accumulation 2 equals one micro-batch of twice the size."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_STEP, str(port)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for layout in ("2", "3", "3o"):
        one, two = out[f"{layout}/1"], out[f"{layout}/2"]
        assert all(stepped for _, stepped in one + two), (layout, one, two)
        assert [n for n, _ in two] == pytest.approx([n for n, _ in one], rel=1e-5), layout


def test_gradient_norm_in_fp64_chunks_equals_the_whole(monkeypatch):
    import torch

    from dsrun import strategy

    grads = [torch.randn(1000, 3, dtype=torch.bfloat16), torch.randn(5), torch.randn(2, 7)]
    whole = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads)
    monkeypatch.setattr(strategy, "NORM_CHUNK", 7)
    assert float(strategy._squared_norm_fp64(grads)) == pytest.approx(float(whole), rel=1e-12)


def test_fused_adamw_skips_a_nonfinite_step_on_the_device():
    """The loop never asks the host whether a step was finite: fused AdamW gets `found_inf` and leaves weights,
    moments and its step count untouched; the next finite step is an ordinary first step, clipped inside the
    kernel (`grad_scale`) exactly as clip_grad_norm_ + AdamW would."""
    import lightning as L
    import torch

    from dsrun.strategy import optimizer_step

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1, eps=1.0, fused=True))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 4)
    (model(x).sum() * float("nan")).backward()
    norm, stepped = optimizer_step(fabric, optimizer, model.parameters(), 1.0)
    assert not bool(stepped) and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in optimizer.optimizer.state.values())
    assert not hasattr(optimizer.optimizer, "found_inf") and all(p.grad is None for p in model.parameters())

    # the unfused reference, one clipped step; eps=1 makes AdamW feel the gradient's scale (Adam ignores it)
    expected = torch.optim.AdamW(reference.parameters(), lr=0.1, eps=1.0)
    reference(x).sum().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    expected.step()
    model(x).sum().backward()
    norm, stepped = optimizer_step(fabric, optimizer, model.parameters(), 1.0)
    assert bool(stepped) and float(norm) > 2, "the step must clip, or clipping goes untested"
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def _reduce_without_barrier(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from dsrun.strategy import all_reduce_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def no_barrier(*args, **kwargs):
        raise AssertionError("a barrier in the step's reductions")

    dist.barrier = no_barrier
    total = all_reduce_(torch.tensor([float(rank + 1)]))
    flag = all_reduce_(torch.tensor([float(rank)]), "max")
    queue.put((rank, float(total), float(flag)))
    dist.destroy_process_group()


def test_the_steps_reductions_queue_no_barrier():
    """Fabric's all_reduce waits at a barrier first (a host sync on every rank); the loop's per-step reductions
    (labelled-token count, stop flag) must not: two per step cost 2-GPU DDP/FSDP a tenth of their speed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_reduce_without_barrier, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in range(2)) == [(0, 3.0, 1.0), (1, 3.0, 1.0)]
