"""GPU benchmark: packing with document masks vs packing without (attention crosses documents) vs one document
per padded row (`data.packing=false`), on a chat set of mixed lengths.

Job: R1-Distill-Qwen-1.5B shape, random init, bf16, seq 2048, micro-batch 4, one GPU, N steps, every token trained
(`data.train_on=all`) so `trained_tokens_per_s` is the rate of real (non-padding) tokens, the number to compare:
`tokens_per_s` counts padding too. Issue #16's bar: masked packing >= 0.95x unmasked packing and >= 1.5x padded.

    python bench/packing.py [--steps 30] [--chats 3000]

Writes $OUT/packing.json (or bench/out/) and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = ["model=r1_distill_qwen_1_5b", "data=jsonl", "data.train_on=all", "train.seq_len=2048", "train.micro_batch=4",
       "precision=bf16", "monitor=none", "optim.warmup_steps=5", "train.lr=1e-4", "hardware=auto",
       "hardware.devices=1", "parallel=single", "train.log_every=5", "train.checkpoint_every=-1"]
CASES = {
    "packed_document_mask": ["data.packing=true", "data.document_mask=true"],
    "packed_unmasked": ["data.packing=true", "data.document_mask=false"],
    "padded": ["data.packing=false"],
}
WORDS = ("the model adds the two numbers then checks each digit carefully before it answers with the sum of "
         "tens and ones so the result is right every time").split()


def chat_set(path: Path, n: int, seed: int = 0) -> Path:
    """Chats whose lengths spread from ~60 to ~1,900 tokens (log-uniform): what reasoning traces look like."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            words = int(10 ** rng.uniform(1.7, 3.25))
            think = " ".join(rng.choice(WORDS) for _ in range(words))
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\nThe sum is {rng.randint(1, 999)}."},
            ]}) + "\n")
    return path


def run_case(name: str, extra: list[str], steps: int, data: Path, out: Path) -> dict:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "dsrun", *JOB, *extra, f"data.path={data}", f"train.max_steps={steps}",
           f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"--- {name} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-1500:]}", flush=True)
        return {"case": name, "status": f"failed: exit {proc.returncode}", "wall_s": round(wall)}
    summary = json.loads((run_dir / "summary.json").read_text())
    data_line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: data:")), "")
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    return {"case": name, "status": "ok", "tokens_per_s": round(summary["tokens_per_s"]),
            "trained_tokens_per_s": round(summary["trained_tokens_per_s"]), "mfu": round(summary["mfu"] or 0, 3),
            "peak_memory_gib": round(summary["peak_memory_gib"], 1), "final_loss": round(summary["final_loss"], 4),
            "data": data_line.removeprefix("dsrun: data: "), "wall_s": round(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chats", type=int, default=3000)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or REPO / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    data = chat_set(out / "chats.jsonl", args.chats)
    rows = [run_case(name, extra, args.steps, data, out) for name, extra in CASES.items()]
    (out / "packing.json").write_text(json.dumps(rows, indent=2))
    by = {r["case"]: r for r in rows if r["status"] == "ok"}
    print("| case | real tokens/s | tokens/s (with padding) | MFU | peak GiB | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['case']} | {r['status']} | | | | |")
            continue
        print(f"| {r['case']} | {r['trained_tokens_per_s']:,} | {r['tokens_per_s']:,} | {r['mfu']} | "
              f"{r['peak_memory_gib']} | {r['final_loss']} |")
    masked = by.get("packed_document_mask")
    for other, bar in (("packed_unmasked", 0.95), ("padded", 1.5)):
        if masked and other in by:
            ratio = masked["trained_tokens_per_s"] / by[other]["trained_tokens_per_s"]
            print(f"masked packing vs {other}: {ratio:.2f}x real tokens/s (bar: >= {bar}x) "
                  f"{'PASS' if ratio >= bar else 'FAIL'}")


if __name__ == "__main__":
    main()
