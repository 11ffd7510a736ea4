"""Tasks a composed config can run (`task=<name>`, listed in dsrun/task_table.py); the Hydra entry point calls
run_task()."""

from __future__ import annotations

import sys
from typing import Any

from rich.tree import Tree
from omegaconf import DictConfig, OmegaConf

from dsrun import sweep
from dsrun.batch import data_parallel_size, global_batch
from dsrun.batch_size import probe_micro_batch as probe
from dsrun.schema import RunConfig, container, typed
from dsrun.config_view import folded_config
from dsrun.errors import UserError
from dsrun.run.ledger import recorded
from dsrun.plan.search import with_suggestions
from dsrun.quiet import console, verbose
from dsrun.run.rollback import prepare_smoke, smoke_problems
from dsrun.run.files import rank_zero, run_dir, write_json
from dsrun.hardware import lift_memory_cap
from dsrun.strategy import check_environment
from dsrun.task_table import RUNNABLE_TASKS, TASKS


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("[bold]dsrun config")
    for group, node in cfg.items():
        branch = tree.add(f"[bold cyan]{group!s}")
        branch.add(OmegaConf.to_yaml(node, resolve=True).rstrip() if OmegaConf.is_config(node) else str(node))
    return tree


def dry_run(cfg: DictConfig) -> None:
    out = console()
    out.print(config_tree(cfg))
    run, tr = typed(cfg), cfg.train
    out.print(f"global batch {global_batch(run)} = micro_batch {tr.micro_batch} x accumulation {tr.accumulation} "
                  f"x data-parallel {data_parallel_size(run)}; {global_batch(run) * tr.seq_len:,} tokens per step")
    out.print("config valid; nothing started (task=dry_run)")


def train(cfg: RunConfig, check: Any = None) -> None:
    import torch

    from dsrun.train import fit

    check_environment(cfg)
    check_plan(cfg)
    if rank_zero() and cfg.monitor.console.enabled:  # folded to groups and overrides unless -v (dsrun/quiet.py)
        if verbose():
            console(stderr=True).print(config_tree(container(cfg)))
        else:
            print(folded_config(container(cfg)), file=sys.stderr)
    folder = run_dir()
    try:
        recorded(cfg, folder, uncapped_on_failure(fit), check)  # one ledger record per run, failures included
    except (torch.OutOfMemoryError, MemoryError) as exc:
        diagnose_oom(cfg, folder, exc)
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc):  # the CPU allocator at hardware.memory_cap_gib (RLIMIT_DATA)
            diagnose_oom(cfg, folder, exc)
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        collective_timeout(cfg, folder, exc)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def after_memory_error(exc: BaseException) -> bool:
    """Whether `exc` was raised while a MemoryError was being handled (torch.save's zip writer fails so)."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__context__
    return False


def uncapped_on_failure(fit: Any) -> Any:
    """`fit` with hardware.memory_cap_gib's CPU heap limit lifted as soon as it fails; an allocation that failed
    inside C code under that limit (a SystemError), or an error raised while one was handled, is the memory error
    it is."""
    def run(cfg: RunConfig, folder: Any) -> Any:
        try:
            return fit(cfg, folder)
        except Exception as exc:
            if lift_memory_cap() and (isinstance(exc, SystemError) or after_memory_error(exc)):
                raise MemoryError(f"an allocation failed under hardware.memory_cap_gib ({first_line(exc)})") from exc
            raise
        except BaseException:
            lift_memory_cap()
            raise
    return run


def collective_timeout(cfg: RunConfig, folder: Any, exc: BaseException) -> None:
    """A collective outlived parallel.timeout_s (a peer hung in NCCL/Gloo or died): name this rank, end the ranks
    this process launched, exit 4 instead of hanging or dumping a traceback."""
    import os
    import sys

    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK", "0")
    print(f"dsrun: error: rank {rank}: a collective did not complete within parallel.timeout_s="
          f"{cfg.parallel.timeout_s} s; another rank hung or died ({first_line(exc)[:160]}). "
          f"{timeout_advice(folder)}", file=sys.stderr)
    end_launched_ranks()
    raise SystemExit(4)


def end_launched_ranks() -> None:
    """SIGKILL the ranks Fabric started from this process and reap them. Reaped here, Lightning's child-process
    observer (a thread that polls them every 5 s) never sees a rank that died and SIGKILLs this process as well,
    which would replace the exit status 4 and the run's record of how it ended with a -9."""
    import os
    import signal
    import threading
    from pathlib import Path

    for thread in threading.enumerate():
        if thread.name == "child-process-observer":  # lightning.fabric's _ChildProcessObserver: let it stop
            thread._finished = True  # type: ignore[attr-defined]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                os.kill(int(entry.name), signal.SIGKILL)
                os.waitpid(int(entry.name), 0)
        except (OSError, ValueError, IndexError):
            continue


def timeout_advice(folder: Any) -> str:
    """Read from the disk: the checkpoint a resume would start from, or that there is none (a save the timeout cut
    short leaves only a `.incomplete` folder, which a resume ignores)."""
    from dsrun.run.checkpoint import last_checkpoint_note

    note = last_checkpoint_note(folder)
    if note.startswith("no "):
        return f"No complete checkpoint exists: dsrun resume {folder} starts over at step 0"
    return f"{note[0].upper()}{note[1:]}: dsrun resume {folder}"


def check_plan(cfg: RunConfig) -> None:
    """Refuse, before anything starts, a GPU recipe the planner says will not fit (train.force=true overrides)."""
    if cfg.hardware.accelerator != "cuda" or cfg.train.force or cfg.hardware.gpu is None:
        return
    verdict = with_suggestions(cfg)
    if verdict.fits:
        return
    fixes = "; ".join(f"{s.change} ({' '.join(s.overrides)}: {s.total_gib:.1f} GiB)"
                      for s in verdict.suggestions if s.fits and not s.pending)[:600]
    raise UserError(f"the plan says this will not fit: {verdict.verdict}. Cheapest fixes: {fixes or 'none'}. "
                    "See task=plan for details; train.force=true launches anyway")


def diagnose_oom(cfg: RunConfig, folder: Any, exc: BaseException) -> None:
    """A real CUDA OOM: one paragraph (what was in memory, what the plan suggests), the allocator's summary saved
    beside the run, exit code 3 instead of a traceback."""
    import sys

    import torch

    verdict = with_suggestions(cfg)
    if cfg.hardware.accelerator == "cuda":
        kind, peak = "GPU", torch.cuda.max_memory_reserved() / 2**30
        (folder / "oom_memory_summary.txt").write_text(torch.cuda.memory_summary())
        cap = torch.cuda.get_device_properties(0).total_memory / 2**30
        if cfg.hardware.emulate or cfg.hardware.memory_cap_gib:
            cap = min(cap, verdict.vram_gib)
    else:
        import resource

        kind, peak, cap = "host", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, verdict.vram_gib
        (folder / "oom_memory_summary.txt").write_text(f"peak RSS {peak:.2f} GiB; cap {cap:.2f} GiB\n{exc}\n")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(verdict.components.items(), key=lambda kv: -kv[1])[:4])
    fixes = "; ".join(f"{s.change} ({' '.join(s.overrides)})" for s in verdict.suggestions[:3] if s.fits)
    write_json(folder / "summary.json", {"status": "oom", "peak_memory_gib": peak, "memory_cap_gib": cap,
                                         "planned_gib": verdict.total_gib, "error": first_line(exc)})
    reached = (f"the step reached {peak:.1f} GiB reserved against {cap:.1f} GiB" if kind == "GPU" else
               f"an allocation beyond the {cap:.2g} GiB cap failed (peak RSS {peak:.1f} GiB, the interpreter included)")
    print(f"dsrun: out of {kind} memory: {reached} "
          f"(the plan expected {verdict.total_gib:.1f} GiB, largest parts in GiB: {parts}). "
          f"Try: {fixes or 'a smaller train.micro_batch with a larger train.accumulation'}. "
          f"The allocator's summary is in {folder / 'oom_memory_summary.txt'}.", file=sys.stderr)
    raise SystemExit(3)


def smoke(cfg: RunConfig) -> None:
    prepare_smoke(cfg)
    train(cfg, check=smoke_problems)  # passing marks the run good: `dsrun rollback` returns to it


def run_task(cfg: RunConfig, probe_micro_batch: bool = False) -> Any:
    if sweep.isolated(cfg):  # under -m each training trial is its own process: a crash cannot end the sweep
        return sweep.run_trial(cfg)  # the trial probes its own train.micro_batch=auto
    if probe_micro_batch and cfg.task.name in RUNNABLE_TASKS and rank_zero():
        check_environment(cfg)
        probe(cfg, run_dir())
    return TASKS[cfg.task.name](cfg)  # dsrun/task_table.py
