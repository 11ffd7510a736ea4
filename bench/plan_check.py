"""GPU self-check of the planner: each configuration is planned (`task=plan plan.json=true`) and then run for real;
planned vs measured peak memory (torch.cuda.max_memory_reserved) and tokens/s (the second half of the run).
Emulated cards run under `hardware.emulate=true` (the H100 capped to the card's VRAM; their speed is planned for
the H100 that runs them): a recipe the plan refuses must really run out of memory there (forced with
train.force=true; dsrun exits 3), one it accepts must really run.

    python bench/plan_check.py [--steps 10] [--only name,name]      # writes $OUT/plan_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
Q15 = ["model=r1_distill_qwen_1_5b", "data=synthetic_tokens", "monitor=none", "optim.warmup_steps=2",
       "train.lr=1e-4", "train.log_every=2", "train.checkpoint_every=-1"]
H100 = ["hardware=1xh100", "precision=bf16"]
CASES = {
    "1.5b_seq2048_mb4": [*H100, "train.seq_len=2048", "train.micro_batch=4"],
    "1.5b_seq2048_mb4_ckpt": [*H100, "train.seq_len=2048", "train.micro_batch=4",
                              "parallel.activation_checkpointing=true"],
    "1.5b_seq1024_mb4": [*H100, "train.seq_len=1024", "train.micro_batch=4"],
    "1.5b_fsdp_offload": [*H100, "parallel=fsdp", "parallel.offload=true", "train.seq_len=1024",
                          "train.micro_batch=2"],
    "1.5b_bf16_true_ckpt": [*H100, "precision=bf16_true", "train.seq_len=2048", "train.micro_batch=4",
                            "parallel.activation_checkpointing=true"],
    "1.5b_zero3_offload": [*H100, "parallel=zero3_offload", "train.seq_len=2048", "train.micro_batch=4"],
    # a 7B that fits a 24 GB card only with its weights, gradients and Adam states in host RAM
    "7b_emulated_24gb_fsdp_offload": ["hardware=3x4090", "hardware.devices=1", "hardware.emulate=true",
                                      "model=r1_distill_qwen_7b", "precision=bf16_true", "parallel=fsdp",
                                      "parallel.offload=true", "parallel.activation_checkpointing=true",
                                      "train.seq_len=1024", "train.micro_batch=1"],
    "emulated_24gb_4090": ["hardware=3x4090", "hardware.devices=1", "hardware.emulate=true", "precision=bf16_true",
                           "train.seq_len=1024", "train.micro_batch=2", "parallel.activation_checkpointing=true"],
    "emulated_8gb_fits_lora": ["hardware=4x4060", "hardware.devices=1", "hardware.emulate=true",
                               "precision=bf16_true", "adapter=lora", "train.seq_len=512", "train.micro_batch=1",
                               "parallel.activation_checkpointing=true"],
    "emulated_8gb_too_big_forced": ["hardware=4x4060", "hardware.devices=1", "hardware.emulate=true",
                                    "precision=bf16", "train.seq_len=512", "train.micro_batch=1",
                                    "train.force=true"],
}


def dsrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsrun", *args], cwd=REPO, capture_output=True, text=True)


def check(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    planned = dsrun("task=plan", "plan.json=true", *Q15, *overrides, f"hydra.run.dir={out / 'plans' / name}")
    if planned.returncode != 0:
        return {"case": name, "status": f"plan failed: {planned.stderr.strip()[-300:]}"}
    p = json.loads((out / "plans" / name / "plan.json").read_text())
    if "hardware.emulate=true" in overrides:  # emulation caps memory only: the speed is the H100's
        on_h100 = dsrun("task=plan", "plan.json=true", *Q15, *overrides, "hardware=1xh100",
                        f"hydra.run.dir={out / 'plans' / (name + '_h100')}")
        if on_h100.returncode == 0:
            p["tokens_per_s"] = json.loads((out / "plans" / (name + "_h100") / "plan.json").read_text())["tokens_per_s"]
    if "parallel.offload=true" in overrides:  # what the same recipe needs without offload
        no = dsrun("task=plan", "plan.json=true", *Q15, *overrides, "parallel.offload=false",
                   f"hydra.run.dir={out / 'plans' / (name + '_no_offload')}")
        if no.returncode == 0:
            p_no = json.loads((out / "plans" / (name + "_no_offload") / "plan.json").read_text())
            p["without_offload"] = f"{p_no['total_gib']:.1f} GiB, fits: {p_no['fits']}"
    run_dir = out / "runs" / name
    run = dsrun(*Q15, *overrides, f"train.max_steps={steps}", f"hydra.run.dir={run_dir}")
    row = {"case": name, "planned_fits": p["fits"], "planned_gib": round(p["total_gib"], 1),
           "capacity_gib": round(p["vram_gib"], 1), "planned_tokens_per_s": round(p["tokens_per_s"]),
           "exit": run.returncode, "without_offload": p.get("without_offload")}
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    if summary.get("status") == "completed" and len(rows) >= 2:
        # the steady state, as bench/strategies.py measures it: the second half of the run (the first steps grow
        # the allocator's pool, under an emulated cap most of all)
        steady = [r["tokens_per_s"] for r in rows if r["step"] > rows[-1]["step"] / 2]
        summary["tokens_per_s"] = sum(steady) / len(steady)
    row.update(status=summary.get("status", "failed"), measured_gib=round(summary.get("peak_memory_gib", 0), 1),
               allocated_gib=round(summary.get("peak_allocated_gib") or 0, 1),
               measured_tokens_per_s=round(summary.get("tokens_per_s", 0)), cap_gib=summary.get("memory_cap_gib"))
    if row["status"] == "completed":
        row["memory_error"] = f"{(p['total_gib'] / summary['peak_memory_gib'] - 1) * 100:+.0f} %"
        row["speed_error"] = f"{(p['tokens_per_s'] / summary['tokens_per_s'] - 1) * 100:+.0f} %"
    elif run.returncode not in (0, 3):
        row["error"] = run.stderr.strip()[-400:]
    else:
        row["message"] = [ln for ln in run.stderr.splitlines() if ln.startswith("dsrun:")][-1:]
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default=",".join(sorted(CASES, key=lambda n: not n.startswith("emulated"))))
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/dsrun-plan-check"))
    rows = []
    for name in args.only.split(","):
        rows.append(check(name, CASES[name], args.steps, out))
        print(json.dumps(rows[-1]), flush=True)
    (out / "plan_check.json").write_text(json.dumps(rows, indent=2))
    print("\n| case | plan fits | planned GiB | measured GiB reserved (allocated) | memory error | planned tok/s | "
          "measured tok/s | speed error | outcome |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f"; without offload the plan needs {r['without_offload']}" if r.get("without_offload") else ""
        print(f"| {r['case']} | {r.get('planned_fits')} | {r.get('planned_gib')} / {r.get('capacity_gib')} | "
              f"{r.get('measured_gib')} ({r.get('allocated_gib')}) | {r.get('memory_error', '')} | "
              f"{r.get('planned_tokens_per_s')} | {r.get('measured_tokens_per_s')} | {r.get('speed_error', '')} | "
              f"{r.get('status')} (exit {r.get('exit')}){extra} |")


if __name__ == "__main__":
    main()
