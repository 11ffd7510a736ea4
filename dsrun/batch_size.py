"""`train.micro_batch=auto`: the largest micro-batch that fits, keeping `train.global_batch` (the arithmetic of the
split is dsrun/batch.py).

global batch = micro_batch x accumulation x data-parallel size. With `train.global_batch=N` the accumulation is
derived per config (a sweep over micro-batch sizes then compares splits at the same optimisation). With
`train.micro_batch=auto` dsrun finds the largest micro-batch that fits, keeping N:

1. the planner's guess (`planned_micro_batch`, during resolve: no device needed) is the largest divisor of
   N / data-parallel whose plan fits the card;
2. before training, rank 0 probes for real (`probe_micro_batch`): a two-step run of the same config at one size
   above the guess, backing off through the smaller divisors while a probe runs out of memory (exit 3);
3. the chosen size goes into the run's config (snapshot, ledger) and onto the command line Fabric re-runs for its
   other ranks, so every rank trains with it without probing again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsrun.batch import data_parallel_size, divisors
from dsrun.child import run_child
from dsrun.errors import UserError
from dsrun.hardware import memory_cap
from dsrun.plan import plan
from dsrun.plan.overrides import apply_overrides

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

PROBE_STEPS = 2  # the second step is the first with optimizer states allocated: the steady-state peak
# Probes run under this share of the run's memory, so the size chosen keeps a margin for what differs between two
# processes (allocator arenas, fragmentation): a size that fit its probe by a few MB once failed the run itself
PROBE_HEADROOM = 0.9


def planned_micro_batch(cfg: RunConfig) -> int:
    """The planner's guess: the largest micro-batch dividing global_batch / data-parallel whose plan fits (1 when
    none does: check_plan then refuses it with the plan's suggestions)."""
    assert cfg.train.global_batch is not None  # auto_problem() requires it with micro_batch=auto
    per_rank = cfg.train.global_batch // data_parallel_size(cfg)
    for size in divisors(per_rank):
        trial = apply_overrides(cfg, [f"train.micro_batch={size}", f"train.accumulation={per_rank // size}"])
        if plan(trial).fits:
            return size
    return 1


def probe_micro_batch(cfg: RunConfig, run_dir: Path) -> int:
    """Rank 0, before launch: run short probes from one size above the planner's guess down, keep the first that
    trains, set it (and the accumulation that keeps the global batch) in `cfg` and on the command line."""
    launcher = next((v for v in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID") if v in os.environ), None)
    if launcher and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise UserError(f"train.micro_batch=auto probes before Fabric starts its ranks; under an external launcher "
                        f"({launcher}) find the size with a plain one-node run, then set train.micro_batch=<it>")
    tr, dp = cfg.train, data_parallel_size(cfg)
    assert tr.global_batch is not None  # auto_problem() requires it with micro_batch=auto
    sizes = divisors(tr.global_batch // dp)
    guess = tr.micro_batch
    start = max(0, sizes.index(guess) - 1)  # the plan errs on the safe side: try one size larger first
    folder = run_dir / "micro_batch_probe"
    tried: list[dict[str, Any]] = []
    for size in sizes[start:]:
        argv = [sys.executable, "-m", "dsrun", *sys.argv[1:], *probe_overrides(cfg, size, dp, folder / str(size))]
        began = time.perf_counter()
        # probes stay out of the run ledger: they are part of this run, not runs of their own
        code, stopped_by = run_child(argv, folder / f"{size}.log",
                                     env={"DSRUN_LEDGER": str(folder / "ledger.sqlite")})
        tried.append({"micro_batch": size, "exit": code, "wall_s": round(time.perf_counter() - began, 1),
                      "result": "fits" if code == 0 else "out of memory" if code == 3 else f"failed (exit {code})"})
        print(f"dsrun: train.micro_batch=auto: micro_batch {size}: {tried[-1]['result']}", file=sys.stderr,
              flush=True)
        if stopped_by:
            raise SystemExit(f"dsrun: stopped by {stopped_by} while probing the micro-batch")
        if code == 0:
            break
        if code != 3 and size > guess:  # the speculative size may fail for other reasons (too little data)
            continue
        if code != 3:
            raise UserError(f"train.micro_batch=auto: the probe at micro_batch {size} failed (exit {code}), not "
                            f"for memory; its log: {folder / f'{size}.log'}")
    else:
        raise UserError(f"train.micro_batch=auto: even micro_batch {sizes[-1]} runs out of memory; see task=plan "
                        "for what fits (activation checkpointing, fsdp/zero3, quantization + LoRA)")
    chosen = tried[-1]["micro_batch"]
    tr.micro_batch, tr.accumulation = chosen, tr.global_batch // (chosen * dp)
    (folder / "probe.json").write_text(json.dumps({"planned": guess, "chosen": chosen, "probes": tried}, indent=2))
    print(f"dsrun: train.micro_batch=auto chose {chosen} (the plan guessed {guess}); accumulation "
          f"{tr.accumulation} keeps the global batch {tr.global_batch}", file=sys.stderr, flush=True)
    sys.argv.append(f"train.micro_batch={chosen}")  # Fabric re-runs sys.argv for its other ranks; the last wins
    return chosen


def probe_overrides(cfg: RunConfig, size: int, dp: int, folder: Path) -> list[str]:
    """The run itself, two optimizer steps long, at `size`, with the accumulation it would really use (up to two
    micro-steps: with accumulation the gradients are alive during the next micro-batch's forward)."""
    assert cfg.train.global_batch is not None  # auto_problem() requires it with micro_batch=auto
    micro_steps = min(2, cfg.train.global_batch // (size * dp))
    return [f"train.micro_batch={size}", f"train.global_batch={size * dp * micro_steps}",
            f"train.max_steps={PROBE_STEPS}", "train.epochs=null", "train.keep_best=false",
            "train.eval_every=0", "data.eval_split=null", "data.eval_path=null", "train.checkpoint_every=-1",
            "train.resume=never", "train.force=true", "train.log_every=1", "task=train", "monitor=none",
            f"hydra.run.dir={folder}", "hydra.output_subdir=null", *probe_cap(cfg)]


def probe_cap(cfg: RunConfig) -> list[str]:
    """The probe's memory cap: PROBE_HEADROOM of the run's (its cap, the emulated card's VRAM, else the GPU's)."""
    cap = memory_cap(cfg.hardware)
    if cap is None and cfg.hardware.accelerator == "cuda":
        import torch

        cap = torch.cuda.get_device_properties(0).total_memory / 2**30
    return [] if cap is None else [f"hardware.memory_cap_gib={cap * PROBE_HEADROOM:.3f}"]
