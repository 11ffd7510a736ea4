"""GPU proof of the recipes that name a card: each runs under `hardware.emulate=true` (the allocator capped to the
card's VRAM) at its own shape (sequence length, micro-batch, checkpointing) with one process, beside its plan.

Per-card memory of single-process, DDP and QLoRA recipes does not depend on the number of cards, so one GPU proves
them; sharded recipes (FSDP, ZeRO-3) are measured per card by bench/scaling.py on the GPUs a machine has.
Random init, synthetic tokens; accumulation 2 (the recipes' own 8-16 would only repeat the same micro-step).

    python bench/recipes.py [--steps 20] [--only 1x4060_qlora,...]

Writes $OUT/recipes.json and prints a Markdown table: planned vs measured peak (reserved), tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_CARD = ["1x4060_qlora", "1x3060_qlora", "4x4060_qlora", "3x4090_ddp"]  # memory independent of card count


def overrides(recipe: str, steps: int) -> list[str]:
    return [f"+recipe={recipe}", "hardware.devices=1", "data=synthetic_tokens", "data.num_samples=64",
            f"train.max_steps={steps}", "train.accumulation=2", "train.log_every=5", "train.checkpoint_every=-1",
            "monitor=none"]


def run(recipe: str, steps: int, out: Path) -> dict:
    common = overrides(recipe, steps)
    plan = subprocess.run([sys.executable, "-m", "dsrun", *common, "task=plan", "plan.json=true"], cwd=REPO,
                          capture_output=True, text=True)
    planned = json.loads(plan.stdout) if plan.returncode == 0 else {}
    run_dir = out / "runs" / recipe
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dsrun", *common, "hardware.emulate=true",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True)
    result = {"recipe": recipe, "planned_gib": round(planned.get("total_gib", 0), 2),
              "plan_fits": planned.get("fits"), "capacity_gib": planned.get("vram_gib"),
              "wall_s": round(time.perf_counter() - started)}
    if proc.returncode != 0:
        return {**result, "status": f"exit {proc.returncode}", "error": proc.stderr[-1500:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    measured = summary["peak_memory_gib"]
    return {**result, "status": "ok", "measured_reserved_gib": round(measured, 2),
            "measured_allocated_gib": round(summary.get("peak_allocated_gib") or 0, 2),
            "load_peak_gib": round(summary.get("load_peak_gib") or 0, 2),
            "plan_error": round(planned.get("total_gib", 0) / measured - 1, 3) if measured else None,
            "tokens_per_s": round(summary["tokens_per_s"]), "final_loss": round(summary["final_loss"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(PER_CARD))
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/bench"))
    results = []
    for recipe in args.only.split(","):
        results.append(run(recipe, args.steps, out))
        print(json.dumps(results[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps(results, indent=1))
    print("| recipe | card (cap) | planned GiB | measured reserved GiB | allocated | plan vs measured | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "ok":
            print(f"| {r['recipe']} | {r['capacity_gib']} GiB | {r['planned_gib']} | {r['measured_reserved_gib']} | "
                  f"{r['measured_allocated_gib']} | {r['plan_error']:+.0%} | {r['tokens_per_s']:,} |")
        else:
            print(f"| {r['recipe']} | {r['capacity_gib']} | {r['planned_gib']} | {r['status']} | | | |")


if __name__ == "__main__":
    main()
