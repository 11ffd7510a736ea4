"""The batch split: `train.global_batch` (accumulation derived from it) and `train.micro_batch=auto`.

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
from typing import Any

from dsrun.errors import UserError

AUTO = "auto"
PROBE_STEPS = 2  # the second step is the first with optimizer states allocated: the steady-state peak


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def global_batch_problem(cfg: Any) -> str | None:
    """Why this config cannot hold `train.global_batch` (None when it can, or when it is unset)."""
    from dsrun.strategy import data_parallel_size

    tr = cfg.train
    target = tr.global_batch
    if target is None or tr.micro_batch == AUTO or not isinstance(tr.micro_batch, int):
        return None  # a micro_batch that is no whole number is validate()'s to report
    per_micro_step = tr.micro_batch * data_parallel_size(cfg)
    if target < 1 or per_micro_step < 1 or target % per_micro_step:
        return (f"train.global_batch={target}: not a multiple of train.micro_batch {tr.micro_batch} x data-parallel "
                f"{data_parallel_size(cfg)} = {per_micro_step}; pick micro-batch sizes that divide it")
    return None


def auto_problem(cfg: Any) -> str | None:
    """Why `train.micro_batch=auto` cannot work for this config (None when it can, or when it is not asked for)."""
    from dsrun.strategy import data_parallel_size

    tr, hw = cfg.train, cfg.hardware
    if tr.micro_batch != AUTO:
        if isinstance(tr.micro_batch, str):
            return f"train.micro_batch={tr.micro_batch}: a number >= 1, or auto (the largest that fits)"
        return None
    if tr.global_batch is None:
        return ("train.micro_batch=auto: set train.global_batch=N, the global batch it keeps while it picks the "
                "micro-batch (e.g. train.global_batch=32)")
    if tr.global_batch < 1 or tr.global_batch % data_parallel_size(cfg):
        return (f"train.global_batch={tr.global_batch}: with train.micro_batch=auto it must be a multiple of the "
                f"data-parallel size {data_parallel_size(cfg)}")
    if hw.num_nodes > 1:
        return ("train.micro_batch=auto probes on one node: find the size with a one-node run "
                "(hardware.num_nodes=1), then set train.micro_batch=<it>")
    return None


def derive_accumulation(cfg: Any) -> None:
    """accumulation = global batch / (micro-batch x data-parallel size); undividable splits are left to validate."""
    from dsrun.strategy import data_parallel_size

    tr = cfg.train
    if tr.global_batch is not None and isinstance(tr.micro_batch, int) and global_batch_problem(cfg) is None:
        tr.accumulation = tr.global_batch // (tr.micro_batch * data_parallel_size(cfg))


def planned_micro_batch(cfg: Any) -> int:
    """The planner's guess: the largest micro-batch dividing global_batch / data-parallel whose plan fits (1 when
    none does: check_plan then refuses it with the plan's suggestions)."""
    from dsrun.plan import apply_overrides, plan
    from dsrun.strategy import data_parallel_size

    per_rank = cfg.train.global_batch // data_parallel_size(cfg)
    for size in divisors(per_rank):
        trial = apply_overrides(cfg, [f"train.micro_batch={size}", f"train.accumulation={per_rank // size}"])
        if plan(trial, suggest=False).fits:
            return size
    return 1


def probe_micro_batch(cfg: Any, run_dir: Path) -> int:
    """Rank 0, before launch: run short probes from one size above the planner's guess down, keep the first that
    trains, set it (and the accumulation that keeps the global batch) in `cfg` and on the command line."""
    from dsrun.strategy import data_parallel_size
    from dsrun.sweep import run_child

    launcher = next((v for v in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID") if v in os.environ), None)
    if launcher and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise UserError(f"train.micro_batch=auto probes before Fabric starts its ranks; under an external launcher "
                        f"({launcher}) find the size with a plain one-node run, then set train.micro_batch=<it>")
    tr, dp = cfg.train, data_parallel_size(cfg)
    sizes = divisors(tr.global_batch // dp)
    guess = tr.micro_batch
    start = max(0, sizes.index(guess) - 1)  # the plan errs on the safe side: try one size larger first
    folder = run_dir / "micro_batch_probe"
    tried: list[dict[str, Any]] = []
    for size in sizes[start:]:
        argv = [sys.executable, "-m", "dsrun", *sys.argv[1:], *probe_overrides(cfg, size, dp, folder / str(size))]
        began = time.perf_counter()
        # probes stay out of the run ledger: they are part of this run, not runs of their own
        code, stopped_by = run_child(argv, folder / str(size) / "probe.log",
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
                            f"for memory; its log: {folder / str(size) / 'probe.log'}")
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


def probe_overrides(cfg: Any, size: int, dp: int, folder: Path) -> list[str]:
    """The run itself, two optimizer steps long, at `size`, with the accumulation it would really use (up to two
    micro-steps: with accumulation the gradients are alive during the next micro-batch's forward)."""
    micro_steps = min(2, cfg.train.global_batch // (size * dp))
    return [f"train.micro_batch={size}", f"train.global_batch={size * dp * micro_steps}",
            f"train.max_steps={PROBE_STEPS}", "train.epochs=null", "train.keep_best=false",
            "train.eval_every=0", "data.eval_split=null", "data.eval_path=null", "train.checkpoint_every=-1",
            "train.resume=never", "train.force=true", "train.log_every=1", "task=train", "monitor=none",
            f"hydra.run.dir={folder}", "hydra.output_subdir=null"]


def chosen_micro_batch(run: Path) -> list[str]:
    """`dsrun resume|replay` of a train.micro_batch=auto run use the size its probe chose (its config.yaml
    snapshot) instead of probing again: the data order and the checkpoint assume that split."""
    snapshot = run / "config.yaml"
    if not snapshot.is_file():
        return []
    from dsrun.safe_read import read_yaml_mapping

    saved = read_yaml_mapping(snapshot, "restore it, or remove it to resume with the snapshot in .hydra/")
    chosen = (saved.get("train") or {}).get("micro_batch") if isinstance(saved.get("train"), dict) else None
    return [f"train.micro_batch={chosen}"] if isinstance(chosen, int) else []
