"""Where batch-1 decode loses its bandwidth (issue #27): the 7B's decode matmuls at 1 and 2 rows through cuBLAS
(`F.linear`, what the engine's compiled step calls) beside a Triton GEMV written for few rows (each program reads
BLOCK_N whole weight rows, coalesced along K; autotuned), in GB/s of weights read.

    python bench/gemv_probe.py [--rows 1,2]

Shapes: R1-Distill-Qwen-7B's projections (q/k/v fused 4,608 x 3,584, o 3,584 x 3,584, gate/up fused
37,888 x 3,584, down 3,584 x 18,944) and its 152,064-row output head, bf16. Each is timed over 200 back-to-back
calls between CUDA events (every call reads more than 25 MB, so launches hide behind the previous kernel); the
weights of all five are distinct buffers bigger than the L2 cache. The last lines add the shapes up as a 28-layer
decode step and say what tokens/s that bounds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
          "head": (152064, 3584)}
LAYERS = 28


@triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                          for n, k in ((2, 1024), (4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 512))
                          for w in (4, 8) for s in (2, 3)],
                 key=["N", "K", "M"])
@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        x0 = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc0 += w * x0[None, :]
        if M == 2:
            x1 = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            acc1 += w * x1[None, :]
    tl.store(y_ptr + rows, tl.sum(acc0, 1).to(y_ptr.dtype.element_ty), mask=row_ok)
    if M == 2:
        tl.store(y_ptr + N + rows, tl.sum(acc1, 1).to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, w, y, n, k, M=m)
    return y


def timed(fn, reads: int, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return reads / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for name, (n, k) in SHAPES.items()}
    for rows in map(int, args.rows.split(",")):
        print(f"\n{rows} row(s): GB/s of weights read\n| matmul | cuBLAS (F.linear) | Triton GEMV | ratio | max abs diff |")
        print("|---|---|---|---|---|")
        step = {"cublas": 0.0, "triton": 0.0}
        for name, w in weights.items():
            x = torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16)
            reads = w.numel() * 2
            a = timed(lambda: F.linear(x, w), reads)
            b = timed(lambda: gemv(x, w), reads)
            diff = (F.linear(x, w).float() - gemv(x, w).float()).abs().max().item()
            times = LAYERS if name != "head" else 1
            step["cublas"] += times * reads / a / 1e9
            step["triton"] += times * reads / b / 1e9
            print(f"| {name} {tuple(w.shape)} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | {diff:.2e} |")
        total = sum((LAYERS if n != "head" else 1) * w.numel() * 2 for n, w in weights.items())
        for kind, seconds in step.items():
            print(f"{kind}: the 7B's matmuls alone {seconds * 1e3:.2f} ms per step = {total / seconds / 1e9:,.0f} GB/s"
                  f" -> at most {1 / seconds:,.0f} tokens/s")
    del weights
    torch.cuda.empty_cache()
    nf4([int(r) for r in args.rows.split(",")])


def nf4(rows_list: list[int]) -> None:
    """bitsandbytes' nf4 matmul (what a `quant=nf4` model runs) at 1 and 2 rows: its fused 4-bit GEMV serves one
    row; two rows dequantize the whole weight first."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    print("\nnf4 (bitsandbytes matmul_4bit, double quant, blocksize 64): GB/s of packed weights read")
    print("| matmul | " + " | ".join(f"{r} row(s)" for r in rows_list) + " |\n|---|" + "---|" * len(rows_list))
    step = dict.fromkeys(rows_list, 0.0)
    total = 0
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        reads = packed.numel() * packed.element_size()
        total += (LAYERS if name != "head" else 1) * reads
        cells = []
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            rate = timed(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), reads)
            step[rows] += (LAYERS if name != "head" else 1) * reads / rate / 1e9
            cells.append(f"{rate:,.0f}")
        print(f"| {name} {(n, k)} | " + " | ".join(cells) + " |")
    for rows, seconds in step.items():
        print(f"nf4 {rows} row(s): the 7B's matmuls alone {seconds * 1e3:.2f} ms per step -> at most "
              f"{1 / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
