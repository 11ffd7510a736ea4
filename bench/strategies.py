"""GPU benchmark: the same bf16 job under every parallel strategy (and fp8 under single), next to the hand-written
transformers loop (shared/anchors/dense_hf.py) measured in the same call.

Job: R1-Distill-Qwen-1.5B shape, random init, synthetic tokens, seq 2048, micro-batch 4, bf16, N steps.
Each strategy runs on all GPUs of the machine (1 on an H100 box; the code handles any count).

    python bench/strategies.py [--steps 30] [--only single,fsdp] [--anchor bench/anchors/dense_hf.py]

Writes $OUT/strategies.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = ["model=r1_distill_qwen_1_5b", "data=synthetic_tokens", "train.seq_len=2048", "train.micro_batch=4",
       "precision=bf16", "monitor=none", "optim.warmup_steps=5", "train.lr=1e-4"]
CASES = {  # cheapest first: a call cut short by its time limit still returns most of the table
    "single": ["parallel=single"],
    "fp8_single": ["parallel=single", "precision=fp8"],
    "single_compile": ["parallel=single", "train.compile=true"],
    "fp8_compile": ["parallel=single", "precision=fp8", "train.compile=true"],
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "fsdp_bf16_reduce": ["parallel=fsdp", "parallel.reduce_dtype=bf16"],
    "fsdp_no_reshard": ["parallel=fsdp", "parallel.reshard_after_forward=false"],  # no all-gather in backward
    "tp": ["parallel=tp", "parallel.tensor_parallel_size=1"],
    "zero2": ["parallel=zero2"],
    "zero3": ["parallel=zero3"],
    "zero3_offload": ["parallel=zero3_offload"],
}


def run_case(name: str, extra: list[str], steps: int, out: Path, gpus: int) -> dict:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "dsrun", *JOB, *extra, f"train.max_steps={steps}", "train.log_every=5",
           "train.checkpoint_every=-1",
           "hardware=auto", f"hardware.devices={gpus}", f"hydra.run.dir={run_dir}"]
    if "single" in name or name.startswith("fp8"):
        cmd[cmd.index(f"hardware.devices={gpus}")] = "hardware.devices=1"
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"--- {name} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"case": name, "status": f"failed: exit {proc.returncode}", "wall_s": round(wall)}
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # 7 GB each: the device's disk holds few
    return {"case": name, "status": "ok", "final_loss": round(summary["final_loss"], 4),
            "tokens_per_s": round(summary["tokens_per_s"]), "mfu": round(summary["mfu"] or 0, 3),
            "peak_memory_gib": round(summary["peak_memory_gib"], 1), "wall_s": round(wall)}


def run_anchor(path: Path, steps: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(path), "eager", "--steps", str(steps)], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"--- anchor failed:\n{proc.stderr[-1500:]}", flush=True)
        return {"case": "anchor_hf_eager", "status": "failed"}
    r = json.loads(lines[-1])
    return {"case": "anchor_hf_eager", "status": "ok", "final_loss": r["loss"], "tokens_per_s": r["tok_s"],
            "mfu": r["mfu_989"], "peak_memory_gib": r["peak_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--anchor", default=str(REPO / "bench" / "anchors" / "dense_hf.py"))
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    out = Path(os.environ.get("OUT", "/tmp/dsrun-bench"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if Path(args.anchor).is_file():
        results.append(run_anchor(Path(args.anchor), args.steps, out))
        print(json.dumps(results[-1]), flush=True)
    for name in args.only.split(","):
        results.append(run_case(name, CASES[name], args.steps, out, gpus))
        print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    (out / "strategies.json").write_text(json.dumps({"device": device, "gpus": gpus, "results": results}, indent=2))
    single = next((r for r in results if r["case"] == "single" and r["status"] == "ok"), None)
    anchor = next((r for r in results if r["case"] == "anchor_hf_eager" and r["status"] == "ok"), None)
    print(f"\n{device} x {gpus}, {args.steps} steps\n")
    print("| case | tokens/s | vs anchor | MFU | peak GiB | last loss | loss vs single |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['case']} | {r['status']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor else "-"
        dloss = f"{(r['final_loss'] / single['final_loss'] - 1) * 100:+.2f} %" if single else "-"
        print(f"| {r['case']} | {r['tokens_per_s']:,} | {ratio} | {r['mfu']:.3f} | {r['peak_memory_gib']} | "
              f"{r['final_loss']} | {dloss} |")


if __name__ == "__main__":
    main()
