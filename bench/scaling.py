"""GPU benchmark: multi-GPU scaling in one job. The 1.5B job of bench/strategies.py (bf16, seq 2048, micro-batch 4
per GPU) on 1 and on all GPUs for each strategy, beside the plain torchrun DDP loop (shared/anchors/ddp_probe.py)
on the same GPU counts; the all-reduce bus bandwidth over message sizes (bench/allreduce.py, as nccl-tests reports
it); the R1-Distill-Qwen-7B full fine-tune under fsdp and zero3 on all GPUs beside the planner's per-GPU peak; the
sharded recipes under `hardware.emulate=true` at their per-GPU shape on the GPUs present.

    python bench/scaling.py [--steps 20] [--parts anchor,strategies,allreduce,7b,recipes]
                            [--cases single@1,ddp@2,fsdp@1,fsdp@2,...] [--profile fsdp@2]

Writes $OUT/scaling.json and prints Markdown tables for BENCHMARKS.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import CASES, JOB, REPO  # noqa: E402  (the same job and cases as the single-GPU table)

RUNS = Path("/tmp/dsrun-scaling")  # run folders stay on the machine; $OUT gets the results
ANCHOR = REPO / "bench" / "anchors" / "ddp_probe.py"
SHARDED_RECIPES = ["4x4090_fsdp_bf16", "3x4090_ddp"]  # at their per-GPU shape
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_bf16_reduce", "fsdp_no_reshard", "tp", "zero2", "zero3")


def dsrun(args: list[str], run_dir: Path) -> tuple[dict | None, str]:
    """(the run's summary, with the profiler's line if it printed one; None and the error tail on failure)."""
    proc = subprocess.run([sys.executable, "-m", "dsrun", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True)
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # 3-15 GB each: the device's disk holds few
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1200:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    profiled = [line for line in proc.stderr.splitlines() if line.startswith("dsrun: profiled steps")]
    return {**summary, "profile": profiled[-1] if profiled else None}, ""


def planned(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dsrun", *args, "task=plan", "plan.json=true"], cwd=REPO,
                          capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def strategy_case(name: str, gpus: int, steps: int, out: Path, profile: bool = False) -> dict:
    args = [*JOB, *CASES[name], f"train.max_steps={steps}", "train.log_every=5", "train.checkpoint_every=-1",
            "hardware=auto", f"hardware.devices={gpus}"]
    if profile:
        args.append("train.profile_steps=3")
    run_dir = RUNS / f"{name}-{gpus}gpu{'-profile' if profile else ''}"
    started = time.perf_counter()
    summary, error = dsrun(args, run_dir)
    row = {"case": name, "gpus": gpus, "wall_s": round(time.perf_counter() - started)}
    if summary is None:
        print(f"--- {name}@{gpus} failed: {error}", flush=True)
        return {**row, "status": error[:300]}
    if profile:  # the operator tables come back with $OUT; the traces are too large to bring back
        for f in (run_dir / "profile").glob("ops_rank*.txt"):
            (out / f"profile-{name}-{gpus}gpu-{f.name}").write_text(f.read_text())
    return {**row, "status": "ok", "tokens_per_s": round(summary["tokens_per_s"]),
            "final_loss": round(summary["final_loss"], 4), "peak_memory_gib": round(summary["peak_memory_gib"], 1),
            **({"profile": summary["profile"]} if profile else {})}


def anchor(gpus: int, out: Path) -> dict:
    proc = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={gpus}", str(ANCHOR)], capture_output=True,
                          text=True, env={**os.environ, "OUT": str(out)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": "plain_ddp", "gpus": gpus, "status": f"failed: {proc.stderr[-600:]}"}
    r = json.loads(lines[-1])
    return {"case": "plain_ddp", "gpus": gpus, "status": "ok", "tokens_per_s": r["tok_s"],
            "peak_memory_gib": r["peak_gib"]}


def allreduce(gpus: int, out: Path) -> list[dict]:
    proc = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={gpus}",
                           str(REPO / "bench" / "allreduce.py")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)})
    print(proc.stdout, flush=True)
    path = out / "allreduce.json"
    return json.loads(path.read_text()) if proc.returncode == 0 and path.is_file() else []


def against_plan(case: str, gpus: int, args: list[str], run: list[str]) -> dict:
    """The planner's per-GPU peak for `args`, then the run (`args` + `run`) and its measured peak."""
    plan = planned(args)
    summary, error = dsrun([*args, *run], RUNS / f"{case}-{gpus}gpu")
    row = {"case": case, "gpus": gpus, "planned_gib": round(plan.get("total_gib", 0), 2),
           "capacity_gib": plan.get("vram_gib")}
    if summary is None:
        return {**row, "status": error[:300]}
    measured = summary["peak_memory_gib"]
    return {**row, "status": "ok", "measured_gib": round(measured, 2), "tokens_per_s": round(summary["tokens_per_s"]),
            "plan_error": round(row["planned_gib"] / measured - 1, 3)}


def seven_b(strategy: str, gpus: int, steps: int) -> dict:
    args = ["model=r1_distill_qwen_7b", "data=synthetic_tokens", "train.seq_len=2048", "train.micro_batch=1",
            "precision=bf16", "monitor=none", f"parallel={strategy}", "parallel.activation_checkpointing=true",
            "hardware=auto", f"hardware.devices={gpus}", f"train.max_steps={steps}", "train.log_every=5",
            "train.checkpoint_every=-1"]
    return against_plan(f"7b_{strategy}", gpus, args, [])


def recipe(name: str, gpus: int, steps: int) -> dict:
    """A recipe at its per-GPU shape on the GPUs present, each capped at its card's memory."""
    args = [f"+recipe={name}", f"hardware.devices={gpus}", "hardware.num_nodes=1", "data=synthetic_tokens",
            "data.num_samples=64", f"train.max_steps={steps}", "train.accumulation=2", "train.log_every=5",
            "train.checkpoint_every=-1", "monitor=none"]
    return against_plan(f"recipe_{name}", gpus, args, ["hardware.emulate=true"])


def table(results: list[dict], device: str, gpus: int, steps: int) -> None:
    runs = {(r["case"], r["gpus"]): r for r in results if r.get("status") == "ok" and "tokens_per_s" in r}
    one = {name: runs.get((name, 1)) for name in ("plain_ddp", *STRATEGIES)}
    plain = runs.get(("plain_ddp", gpus))
    print(f"\n{device} x {gpus}, {steps} steps, 1.5B shape, seq 2048, micro-batch 4 per GPU\n")
    print(f"| case | GPUs | tokens/s | vs its own 1 GPU | vs plain DDP on {gpus} | peak GiB | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["case"] not in ("plain_ddp", *STRATEGIES):
            continue
        if r.get("status") != "ok":
            print(f"| {r['case']} | {r['gpus']} | {r['status'][:60]} | | | | |")
            continue
        # a variant (fsdp_bf16_reduce) against its strategy on 1 GPU; ddp/zero on 1 GPU is the single-process run
        base = one.get(r["case"]) or one.get(r["case"].split("_")[0]) or one.get("single")
        own = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["gpus"] > 1 else "-"
        vs = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain and r["gpus"] == gpus else "-"
        print(f"| {r['case']} | {r['gpus']} | {r['tokens_per_s']:,} | {own} | {vs} | {r.get('peak_memory_gib')} | "
              f"{r.get('final_loss', '-')} |")
    rest = [r for r in results if r["case"].startswith(("7b_", "recipe_"))]
    if rest:
        print("\n| run | GPUs | planned GiB per GPU | measured reserved GiB | plan vs measured | tokens/s |")
        print("|---|---|---|---|---|---|")
        for r in rest:
            if r.get("status") != "ok":
                print(f"| {r['case']} | {r['gpus']} | {r['planned_gib']} | {r['status'][:60]} | | |")
            else:
                print(f"| {r['case']} | {r['gpus']} | {r['planned_gib']} | {r['measured_gib']} | "
                      f"{r['plan_error']:+.0%} | {r['tokens_per_s']:,} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", default="anchor,strategies,allreduce,7b,recipes")
    parser.add_argument("--cases", default=None, help="name@gpus,... (default: single@1, fsdp@1, then every "
                                                      "multi-GPU strategy on all GPUs)")
    parser.add_argument("--profile", default="", help="name@gpus,... also run once with train.profile_steps=3")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    out = Path(os.environ.get("OUT", "/tmp/dsrun-bench"))
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    cases = args.cases.split(",") if args.cases else \
        ["single@1", "fsdp@1", *(f"{s}@{gpus}" for s in STRATEGIES[1:] if gpus > 1)]
    results: list[dict] = []

    def record(row: dict) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "scaling.json").write_text(json.dumps({"gpus": gpus, "results": results}, indent=1))

    if "anchor" in parts:
        for n in sorted({1, gpus}):
            record(anchor(n, out))
    if "strategies" in parts:
        for case in cases:
            name, n = case.split("@")
            record(strategy_case(name, int(n), args.steps, out))
        for case in filter(None, args.profile.split(",")):
            name, n = case.split("@")
            record({**strategy_case(name, int(n), 8, out, profile=True), "case": f"{name}_profiled"})
    if "allreduce" in parts and gpus > 1:
        record({"case": "allreduce", "gpus": gpus, "status": "ok", "sizes": allreduce(gpus, out)})
    if "7b" in parts:
        for strategy in ("fsdp", "zero3"):
            record(seven_b(strategy, gpus, 10))
    if "recipes" in parts:
        for name in SHARDED_RECIPES:
            record(recipe(name, gpus, 10))
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    table(results, device, gpus, args.steps)


if __name__ == "__main__":
    main()
