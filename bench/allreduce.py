"""The plain all-reduce baseline for `dsrun doctor`'s sweep: torch.distributed alone, no dsrun code, timed with
CUDA events per size the way nccl-tests' all_reduce_perf times its loop (float32 sum, in place, mean of N after
warm-up). `dsrun doctor` on the same GPUs should report the same bus bandwidth within a few percent.

    torchrun --nproc_per_node 2 bench/allreduce.py                  # 2 GPUs, NCCL: 8 B .. 256 MiB
    torchrun --nproc_per_node 2 bench/allreduce.py --max-bytes 4194304   # CPU box: Gloo, 8 B .. 4 MiB

Rank 0 prints one line per size (bytes, time us, algbw GB/s, busbw GB/s) and writes $OUT/allreduce.json when $OUT
is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--min-bytes", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    n, rows, size = dist.get_world_size(), [], args.min_bytes
    while size <= args.max_bytes:
        x = torch.zeros(size // 4, device=device)
        for _ in range(args.warmup):
            dist.all_reduce(x)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(args.iterations):
                dist.all_reduce(x)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / args.iterations
        else:
            t0 = time.perf_counter()
            for _ in range(args.iterations):
                dist.all_reduce(x)
            seconds = (time.perf_counter() - t0) / args.iterations
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "time_us": seconds * 1e6, "algbw_gbs": algbw, "busbw_gbs": algbw * 2 * (n - 1) / n})
        size *= 4
    if dist.get_rank() == 0:
        for r in rows:
            print(f"{r['bytes']:>12,} {r['time_us']:>10.1f} us {r['algbw_gbs']:>8.2f} GB/s algbw "
                  f"{r['busbw_gbs']:>8.2f} GB/s busbw")
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "allreduce.json").write_text(json.dumps({"ranks": n, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
