"""What is in GPU memory at a dsrun run's peak: runs dsrun in this process with torch's allocator history on, then
replays the trace and prints the blocks alive at the peak of allocated memory, grouped by where they were allocated.
Used to check the planner's components (dsrun/plan/memory.py) against a real step.

    python bench/memory_snapshot.py NAME [dsrun overrides...]     # writes $OUT/NAME.txt (and prints it)
"""

from __future__ import annotations

import os
import runpy
import sys
from collections import defaultdict
from pathlib import Path

import torch

SKIP = ("torch/nn/modules/module.py", "torch/utils/", "torch/_", "contextlib.py", "torch/autograd/",
        "lightning/", "functools.py")


def label(frames: list[dict]) -> str:
    """The innermost frame outside torch's and Lightning's plumbing, with the innermost frame of all."""
    inner = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    useful = next((f for f in frames if not any(s in f["filename"] for s in SKIP)), inner)
    short = lambda f: f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"  # noqa: E731
    return short(useful) if useful is inner else f"{short(useful)} <- {short(inner)}"


def peak_blocks(snapshot: dict) -> tuple[int, int, dict[str, int]]:
    """(peak allocated bytes, event index of the peak, bytes by label alive then)."""
    events = snapshot["device_traces"][0]
    live, total, best, at = {}, 0, -1, 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, at = total, i
    live = {}
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, int] = defaultdict(int)
    for e in live.values():
        groups[label(e.get("frames", []))] += e["size"]
    return best, at, dict(groups)


def main() -> None:
    name, overrides = sys.argv[1], sys.argv[2:]
    out = Path(os.environ.get("OUT", "/tmp")) / f"{name}.txt"
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    sys.argv = ["dsrun", *overrides]
    try:
        runpy.run_module("dsrun", run_name="__main__")
    except SystemExit:
        pass
    snapshot = torch.cuda.memory._snapshot()
    best, at, groups = peak_blocks(snapshot)
    lines = [f"{name}: peak allocated {best / 2**30:.2f} GiB at event {at} of {len(snapshot['device_traces'][0])}; "
             f"max reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB"]
    for where, size in sorted(groups.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {size / 2**30:7.3f} GiB  {where}")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
