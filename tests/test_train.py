"""The default job, end to end, as a user runs it: learns, fills its run folder, keeps secrets out, reloads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import FAST, dsrun, read_metrics

SECRETS = {"WANDB_API_KEY": "wandb-secret-123", "HF_TOKEN": "hf-secret-456", "MY_SERVICE_PASSWORD": "pw-secret-789",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-000"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, float, object]:
    """`python -m dsrun` exactly as the README says (only the run folder pinned), with secrets in the env."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    started = time.perf_counter()
    proc = dsrun(run_dir=run_dir, env=SECRETS, timeout=400, fresh=True)  # the real start-up time counts
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, wall, proc


def test_default_job_learns_in_under_three_minutes(default_run):
    run_dir, wall, _ = default_run
    losses = [m["loss"] for m in read_metrics(run_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert wall < 180, f"default job took {wall:.0f} s"


def test_run_folder_holds_everything(default_run):
    run_dir, _, _ = default_run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "env.json", "metrics.jsonl",
                 "summary.json", "model/model.safetensors", "model/config.json"):
        assert (run_dir / name).is_file(), name
    for row in read_metrics(run_dir):
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= row.keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 150
    assert {"final_loss", "tokens_per_s", "peak_memory_gib", "wall_time_s"} <= summary.keys()
    env = json.loads((run_dir / "env.json").read_text())
    assert {"python", "torch", "lightning", "transformers", "dsrun", "git_commit", "gpus"} <= env.keys()
    resolved = (run_dir / "config.yaml").read_text()
    assert "accelerator: cpu" in resolved and "mode: 32-true" in resolved, "hardware=auto resolved and recorded"
    with safe_open(run_dir / "model/model.safetensors", "pt") as f:
        assert any("embed_tokens" in k for k in f.keys())


def test_no_secret_reaches_the_run_folder(default_run):
    run_dir, _, proc = default_run
    env = json.loads((run_dir / "env.json").read_text())["env"]
    assert env["WANDB_API_KEY"] == "<redacted>" and env["HF_TOKEN"] == "<redacted>"
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_text(errors="replace")
            for secret in SECRETS.values():
                assert secret not in text, f"{secret} leaked into {path}"
    for secret in SECRETS.values():
        assert secret not in proc.stdout + proc.stderr


def test_saved_weights_reload_from_their_local_folder(default_run, tmp_path):
    """The real loading path (model.init=pretrained, model.path=folder) picks up where the run ended."""
    run_dir, _, _ = default_run
    final = json.loads((run_dir / "summary.json").read_text())["final_loss"]
    proc = dsrun(*FAST, "model.init=pretrained", f"model.path={run_dir / 'model'}", "train.max_steps=2",
                 "train.lr=1e-9", "optim.warmup_steps=0", run_dir=tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = read_metrics(tmp_path / "again")[0]["loss"]
    assert first < final * 1.5 < 11, (first, final)


def test_accumulation_gives_the_same_step_as_one_big_micro_batch(tmp_path):
    """Same global batch two ways (mb 4; mb 2 x acc 2): same losses and gradient norms. (DDP, FSDP and TP against
    one process: tests/test_strategies.py.)"""
    common = [*FAST, "train.max_steps=2", "optim.warmup_steps=0"]
    runs = {
        "single": dsrun(*common, "train.micro_batch=4", run_dir=tmp_path / "single"),
        "accumulate": dsrun(*common, "train.micro_batch=2", "train.accumulation=2", run_dir=tmp_path / "accumulate"),
    }
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    for ref, got in zip(read_metrics(tmp_path / "single"), read_metrics(tmp_path / "accumulate")):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)


def test_bf16_true_weights_are_created_in_bf16_not_cast_from_fp32():
    # an fp32 build then cast peaked at 1.5x the weights: 7.1 GiB for a 1.5B model on an 8 GB card
    import torch
    from hydra import compose, initialize_config_dir

    from dsrun.schema import register_configs
    from dsrun.model import architecture, build_model, weight_dtype
    from tests.conftest import REPO

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hardware=cpu", "precision=bf16_true"])
    model = build_model(cfg.model, architecture(cfg.model), seed=0, dtype=weight_dtype(cfg.precision.mode))
    # transformers may keep a few modules in fp32 on purpose (5.24: the MoE router's gate), nothing else
    kept = [*(model._keep_in_fp32_modules or []), *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]
    wide = {n: p.dtype for n, p in model.named_parameters()
            if p.dtype != torch.bfloat16 and not any(k in n for k in kept)}
    assert not wide, wide
    assert weight_dtype("bf16-mixed") == torch.float32


def test_profile_steps_write_a_trace_and_an_operator_table(tmp_path):
    """train.profile_steps=2: steps 3-4 profiled (one skipped, one warm-up), a Perfetto/chrome trace and an
    operator table in profile/, and one line naming where the time went."""
    run_dir = tmp_path / "run"
    proc = dsrun(*FAST, "train.max_steps=5", "train.profile_steps=2", "train.seq_len=32", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads((run_dir / "profile" / "trace_rank0.json").read_text())
    steps = sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps  # the profiler counts from 0: loop steps 3 and 4
    assert "aten::mm" in (run_dir / "profile" / "ops_rank0.txt").read_text()
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: profiled steps"))
    assert "profiled steps 3-4" in line and "largest operators: aten::" in line, line


def test_gpu_busy_time_is_the_union_of_kernels_over_streams(tmp_path):
    from dsrun.profiling import device_time

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "ts": 0, "dur": 10}, {"cat": "kernel", "ts": 5, "dur": 10},  # two streams overlap
        {"cat": "kernel", "ts": 6, "dur": 2}, {"cat": "gpu_memcpy", "ts": 20, "dur": 5},
        {"cat": "cpu_op", "ts": 0, "dur": 100}, {"cat": "gpu_user_annotation", "ts": 0, "dur": 100}]}))
    assert device_time(trace)[0] == 20


def test_exposed_communication_is_nccl_time_with_no_other_kernel_running(tmp_path):
    """The profile line's multi-GPU figure, from a trace whose overlap is known: an all-gather 0-10 us beside a
    matmul 5-20 us on another stream, a reduce-scatter 30-40 us alone, a copy 35-37 us under it."""
    from dsrun.profiling import device_time

    def event(name, cat, ts, dur):
        return {"name": name, "cat": cat, "ts": ts, "dur": dur, "ph": "X"}

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        event("ncclDevKernel_AllGather_RING_LL", "kernel", 0, 10), event("nvjet_gemm", "kernel", 5, 15),
        event("ncclDevKernel_ReduceScatter_Sum_f32", "kernel", 30, 10), event("Memcpy DtoD", "gpu_memcpy", 35, 2),
        event("aten::mm", "cpu_op", 0, 100)]}))
    assert device_time(trace) == (30.0, 20.0, 13.0)  # exposed: 5 us of the all-gather, 8 of the reduce-scatter


def test_mfu_under_emulation_is_against_the_card_that_runs(monkeypatch):
    """Issue 30: an RTX 3060 recipe proven on an H100 (hardware.emulate=true) reported MFU against the 3060's peak
    (4.74 = 474 %). The peak is the card found; without emulation, the one named."""
    from omegaconf import OmegaConf

    from dsrun import hardware
    from dsrun.train import peak_flops_per_s

    monkeypatch.setattr(hardware, "detect", lambda: {"accelerator": "cuda", "devices": 1, "gpu": "h100_sxm",
                                                     "device_name": "NVIDIA H100 80GB HBM3"})
    catalog = hardware.gpu_catalog()
    emulated = OmegaConf.create({"hardware": {"accelerator": "cuda", "gpu": "rtx3060", "emulate": True}})
    assert peak_flops_per_s(emulated) == catalog["h100_sxm"]["bf16_tflops"] * 1e12
    named = OmegaConf.create({"hardware": {"accelerator": "cuda", "gpu": "rtx3060", "emulate": False}})
    assert peak_flops_per_s(named) == catalog["rtx3060"]["bf16_tflops"] * 1e12
    cpu = OmegaConf.create({"hardware": {"accelerator": "cpu", "gpu": None, "emulate": False}})
    assert peak_flops_per_s(cpu) == 0.0
