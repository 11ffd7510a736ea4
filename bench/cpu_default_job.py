"""The default job (`python -m dsrun`, the README's first command) on this machine's CPU: wall time and tokens/s of
a baseline source tree beside this one, and this one without huge pages, interleaved in one invocation.

    git archive <commit> dsrun conf | tar -x -C bench/_baseline     # the code before the change (git-ignored)
    python bench/cpu_default_job.py --repeats 1

Writes bench/out/cpu_default_job.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "_baseline"


def run(tree: Path, env: dict[str, str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dsrun", f"hydra.run.dir={out}"], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, **env})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "tokens_per_s": summary["tokens_per_s"], "final_loss": summary["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cases = {"this tree": (REPO, {}), "this tree, THP_MEM_ALLOC_ENABLE=0": (REPO, {"THP_MEM_ALLOC_ENABLE": "0"})}
    if BASELINE.is_dir():
        cases = {"baseline tree": (BASELINE, {"THP_MEM_ALLOC_ENABLE": "0"}), **cases}
    out = REPO / "bench" / "out"
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, (tree, env) in cases.items():
            results[name].append(run(tree, env, Path(tempfile.mkdtemp(prefix="dsrun-default-job-")) / "run"))
            print(f"{name}: {results[name][-1]}", file=sys.stderr)
    first = next(iter(results.values()))
    reference = statistics.median(r["wall_s"] for r in first)
    print("| case | wall s (median) | tokens/s | final loss | speed-up |\n|---|---|---|---|---|")
    for name, rows in results.items():
        wall = statistics.median(r["wall_s"] for r in rows)
        print(f"| {name} | {wall:.1f} | {statistics.median(r['tokens_per_s'] for r in rows):,.0f} | "
              f"{rows[-1]['final_loss']:.4f} | {reference / wall:.2f}x |")
    (out / "cpu_default_job.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
