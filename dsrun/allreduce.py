"""A measured all-reduce sweep over message sizes, reported as nccl-tests reports it: per size the time of one
all-reduce (the slowest rank's mean over the timed iterations), algorithm bandwidth = bytes / time and bus bandwidth
= algbw x 2(n-1)/n, the rate each rank's link carries in a ring, comparable across rank counts
(nccl-tests doc/PERFORMANCE.md).

Locally the sweep starts its own processes (one per GPU over NCCL, or CPU processes over Gloo); under
`torchrun --nnodes N` the launched ranks are the processes and the sweep crosses the nodes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

WARMUP = 3  # untimed all-reduces per size: the first ones set up connections and buffers


def sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """min, 4 x min, 16 x min, ... up to max (included), whole float32 elements."""
    out, size = [], max(4, min_bytes // 4 * 4)
    while size < max_bytes:
        out.append(size)
        size *= 4
    return [*out, max_bytes // 4 * 4]


def bus_factor(ranks: int) -> float:
    """Bytes each rank's link carries per byte all-reduced by a ring: 2(n-1)/n."""
    return 2 * (ranks - 1) / ranks


def all_reduce_seconds(nbytes: float, ranks: int, bus_bytes_per_s: float) -> float:
    """One ring all-reduce of `nbytes` over `ranks` at a bus bandwidth: what DDP's gradient sync costs."""
    return nbytes * bus_factor(ranks) / bus_bytes_per_s if ranks > 1 else 0.0


def measure(message_sizes: list[int], iterations: int, device: Any) -> list[dict[str, float]]:
    """Time all-reduces in the current process group; every rank gets the same rows."""
    import torch
    import torch.distributed as dist

    ranks, rows = dist.get_world_size(), []
    for size in message_sizes:
        buffer = torch.zeros(size // 4, dtype=torch.float32, device=device)  # zeros: sums never overflow
        for _ in range(WARMUP):
            dist.all_reduce(buffer)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(buffer)
        _sync(device)
        elapsed = torch.tensor([(time.perf_counter() - start) / iterations], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a collective is as fast as its slowest rank
        seconds = elapsed.item()
        algbw = size / seconds
        rows.append({"bytes": size, "time_us": seconds * 1e6, "algbw_gbs": algbw / 1e9,
                     "busbw_gbs": algbw * bus_factor(ranks) / 1e9})
    return rows


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _worker(rank: int, ranks: int, backend: str, port: int, message_sizes: list[int], iterations: int,
            timeout_s: float, out: str) -> None:
    import torch
    import torch.distributed as dist

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=timeout_s))
    try:
        rows = measure(message_sizes, iterations, device)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()  # without it a rank can leave while another still tears down (one rank aborted:
        # "terminate called without an active exception")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_sweep(backend: str, ranks: int, message_sizes: list[int], iterations: int, timeout_s: float,
                scratch: Path) -> list[dict[str, float]]:
    """Start `ranks` processes on this machine and sweep. Gloo ranks are forked (the parent's imports are reused:
    a second instead of a fresh interpreter each); NCCL ranks are spawned, as CUDA cannot cross a fork."""
    import torch.multiprocessing as mp

    out = scratch / "allreduce.json"
    mp.start_processes(_worker, args=(ranks, backend, _free_port(), message_sizes, iterations, timeout_s, str(out)),
                       nprocs=ranks, join=True, start_method="spawn" if backend == "nccl" else "fork")
    return json.loads(out.read_text())


def launched() -> bool:
    """Whether torchrun (or another elastic launcher) started this process as one rank of several."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_sweep(message_sizes: list[int], iterations: int, timeout_s: float) -> tuple[list[dict[str, float]],
                                                                                          dict[str, Any]]:
    """Sweep across the ranks torchrun started (NCCL when this node has GPUs, else Gloo): (rows, topology)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        rows = measure(message_sizes, iterations, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    world, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return rows, {"backend": backend, "ranks": world, "nodes": world // per_node}
