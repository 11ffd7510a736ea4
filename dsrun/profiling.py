"""`train.profile_steps=N`: torch.profiler over N optimizer steps after two unprofiled ones (one to skip, one to
warm the profiler up). Each rank writes `profile/trace_rank<r>.json` (chrome://tracing, Perfetto) and
`profile/ops_rank<r>.txt` (operators by self time); rank 0 prints one line saying how busy the GPU was, which tells
a host-bound step (Python issuing kernels) from a device-bound one before anyone opens the trace."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

WAIT, WARMUP = 1, 1


class StepProfiler:
    def __init__(self, steps: int, run_dir: Path, rank: int, device: torch.device, start_step: int = 0):
        self.steps, self.out, self.rank, self.device = steps, run_dir / "profile", rank, device
        self.start_step = start_step
        self.calls, self.started, self.wall_us = 0, 0.0, 0.0
        self.prof: Any = None
        if steps <= 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, on_trace_ready=self._write,
            schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=steps, repeat=1))
        self.prof.start()

    def step(self) -> None:
        """Call once after every optimizer step."""
        if self.prof is None:
            return
        self.calls += 1
        if self.calls == WAIT + WARMUP:
            self._sync()
            self.started = time.perf_counter()
        last = self.calls == WAIT + WARMUP + self.steps
        if last:
            self._sync()
            self.wall_us = (time.perf_counter() - self.started) * 1e6  # before the profiler collects its events
        self.prof.step()  # the last one writes (_write)
        if last:
            self.prof.stop()
            self.prof = None

    def stop(self) -> None:
        """A run that ends (or is interrupted) before the profiled steps are over writes nothing."""
        if self.prof is not None:
            self.prof.on_trace_ready = None
            self.prof.stop()
            self.prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, prof: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        device = self.device.type == "cuda"
        key = "self_device_time_total" if device else "self_cpu_time_total"
        ops = prof.key_averages()
        (self.out / f"ops_rank{self.rank}.txt").write_text(ops.table(sort_by=key, row_limit=60))
        if self.rank != 0:
            return
        # operators only: ProfilerStep#N and Optimizer.step#... are ranges that contain them
        ops = [op for op in ops if op.key.startswith("aten::") or op.key.startswith("c10d::")]
        total = sum(getattr(op, key) for op in ops)
        top = sorted(ops, key=lambda op: getattr(op, key), reverse=True)[:4]
        shares = ", ".join(f"{op.key} {getattr(op, key) / total:.0%}" for op in top) if total else "none"
        first = self.start_step + WAIT + WARMUP + 1
        busy_us, comm, exposed = device_time(trace) if device else (0.0, 0.0, 0.0)
        busy = f"GPU busy {busy_us / self.wall_us:.0%} of the wall time; " if device else ""
        if comm:
            busy += (f"collectives {comm / self.steps / 1e3:.1f} ms a step, {exposed / self.steps / 1e3:.1f} ms of it "
                     "with no other kernel running; ")
        print(f"dsrun: profiled steps {first}-{first + self.steps - 1} ({self.out}): {busy}largest operators: "
              f"{shares}", file=sys.stderr)


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, stop) spans as disjoint sorted spans."""
    merged: list[tuple[float, float]] = []
    for begin, stop in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((begin, stop))
    return merged


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(stop - begin for begin, stop in spans)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged span lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def device_time(trace: Path) -> tuple[float, float, float]:
    """Microseconds of the trace's GPU time, read in one pass: (busy: at least one kernel, copy or memset ran, the
    union over streams — below ~90 % of the wall time the GPU waits for the host to issue work; communication: NCCL's
    kernels; exposed: the part of that during which no other kernel ran — what a multi-GPU step loses to its
    collectives, however well the rest overlaps)."""
    comm: list[tuple[float, float]] = []
    other: list[tuple[float, float]] = []
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            (comm if "nccl" in e.get("name", "").lower() else other).append((e["ts"], e["ts"] + e["dur"]))
    comm, other = _merged(comm), _merged(other)
    return _length(_merged(comm + other)), _length(comm), _length(comm) - _overlap(comm, other)
