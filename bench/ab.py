"""A/B: the same dsrun runs under a baseline source tree and this one, interleaved (A B A B ...) in one call, so a
code change is measured against its own baseline on the same machine, not against a number from another lease.

    git archive HEAD dsrun conf | tar -x -C bench/_baseline      # here, before the change (bench/_baseline is
    python bench/ab.py --cases 1.5b_seq1024_mb4,emulated_24gb_4090 --steps 20 --repeats 2   # ignored: carry it)

Cases are bench/plan_check.py's (R1-Distill-Qwen-1.5B shape, synthetic tokens). Tokens/s is the steady state: the
mean of the logged intervals in the second half of each run. Writes $OUT/ab.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_check import CASES, Q15, REPO  # noqa: E402


def run(tree: Path, name: str, steps: int, out: Path) -> dict:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "dsrun", *Q15, *CASES[name], f"train.max_steps={steps}",
                           f"hydra.run.dir={run_dir}"], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in rows if r["step"] > rows[-1]["step"] / 2]
    return {"status": "ok", "tokens_per_s": sum(steady) / len(steady), "final_loss": rows[-1]["loss"],
            "peak_gib": rows[-1]["peak_memory_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=str(REPO / "bench" / "_baseline"))
    parser.add_argument("--cases", default="1.5b_seq2048_mb4,1.5b_seq1024_mb4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trees = {"baseline": Path(args.baseline).resolve(), "this tree": REPO}
    if not (trees["baseline"] / "dsrun").is_dir():
        sys.exit(f"--baseline {args.baseline}: no dsrun/ there (git archive <ref> dsrun conf | tar -x -C ...)")
    out = Path(os.environ.get("OUT", "/tmp/dsrun-ab"))
    results = []
    for name in args.cases.split(","):
        for repeat in range(args.repeats):
            for label, tree in trees.items():
                results.append({"case": name, "tree": label, "repeat": repeat, **run(tree, name, args.steps, out)})
                print(json.dumps(results[-1]), flush=True)
    (out / "ab.json").write_text(json.dumps(results, indent=2))
    print("\n| case | baseline tok/s | this tree tok/s | ratio | last loss baseline / this tree |")
    print("|---|---|---|---|---|")
    for name in args.cases.split(","):
        got = {label: [r for r in results if r["case"] == name and r["tree"] == label and r["status"] == "ok"]
               for label in trees}
        if not all(got.values()):
            print(f"| {name} | failed | | | |")
            continue
        a, b = (statistics.median(r["tokens_per_s"] for r in got[label]) for label in trees)
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | {got['baseline'][-1]['final_loss']:.4f} / "
              f"{got['this tree'][-1]['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
