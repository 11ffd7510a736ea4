"""A run folder is append-only history: one run, its checkpoints, weights and snapshot, owned by one process.

Before Hydra touches an existing folder (it would rewrite `.hydra/`), rank 0 claims it:
- a lock file (`.dsrun.lock`, the owner's pid, host and start time, held with flock for the life of the process):
  a second dsrun on the folder is refused; a lock left by a killed process is reported and taken over;
- a folder whose snapshot (`.hydra/config.yaml`) differs from the new config in a key outside RESUMABLE is
  refused with the difference and the way out (a new hydra.run.dir, or train.overwrite=true to replace the run);
- `train.resume=never` on a folder that holds checkpoints or weights is refused unless train.overwrite=true;
- a continuation keeps the original snapshot (Hydra is told not to rewrite it) and appends one line to
  `resumes.jsonl` beside it: time, the overrides, what they changed, git commit, host.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import platform
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dsrun.batch import global_batch
from dsrun.errors import UserError
from dsrun.run.files import git_commit, metrics_row
from dsrun.safe_read import read_yaml_mapping
from dsrun.schema import typed

LOCK = ".dsrun.lock"
SWEEP_LOCK = ".dsrun-sweep.lock"  # held by a sweep's parent for the whole sweep: a second sweep into it is refused
RESUMES = "resumes.jsonl"
SNAPSHOT = Path(".hydra") / "config.yaml"
# What a run leaves in its folder besides Hydra's snapshot: present means the folder holds a run, not just a plan
OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "summary.json")
# What train.overwrite=true removes before the new run starts (Hydra rewrites .hydra/ itself)
REPLACED = (*OUTPUTS, "metrics.set_aside.jsonl", "env.json", "record.json", RESUMES, "deepspeed.json", "tensorboard",
            "wandb", "profile", "micro_batch_probe", "oom_memory_summary.txt")

# The keys a continuation may change: how the run is executed, watched and how far it goes, and the two knobs that
# rescue a diverging run (train.lr, optim.grad_clip); never what defines it (model, data, optimizer, sequence length,
# seeds). `group.*` is every key of the group. The global batch (micro_batch x accumulation x data-parallel) must
# stay the same: checked separately.
RESUMABLE = ("train.resume", "train.overwrite", "train.max_steps", "train.epochs", "train.lr", "optim.grad_clip", "train.log_every",
             "train.checkpoint_every",
             "train.keep_checkpoints", "train.force", "train.max_nonfinite_steps", "train.profile_steps",
             "train.compile", "train.micro_batch", "train.accumulation", "train.global_batch", "hardware.*",
             "parallel.timeout_s", "parallel.activation_checkpointing", "parallel.reshard_after_forward",
             "model.experts_implementation", "monitor.*", "plan.*")

# The files a run writes and appends to (never folders)
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.set_aside.jsonl", "summary.json", RESUMES, "record.json", "env.json", "dsrun.log",
             LOCK, "deepspeed.json")
# What a sweep run again over its own folders may change in a trial (anything else would be another trial)
SWEEP_RESUMABLE = ("train.resume", "train.max_steps", "hardware.", "monitor.", "plan.")
# What a folder holds once dsrun has started in it, before Hydra's snapshot (the lock, the job log)
STARTED = (LOCK, "dsrun.log")
# the job log of another rank (torchrun starts every rank's Hydra; cli.main names them dsrun_rank<N>): a second node
# may write it into a shared folder before rank 0 claims the folder
RANK_LOG = re.compile(r"dsrun_rank\d+\.log")

_held: list[int] = []
_readers: list[int] = []  # shared locks on run folders this process reads  # the lock's file descriptor, open until the process ends


def resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1])) for allowed in RESUMABLE)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for each key whose value differs. Keys the old snapshot lacks are newer options the old
    run ran without: not a difference."""
    a, b = flatten(old), flatten(new)
    return [(key, a[key], b.get(key, "(absent)")) for key in sorted(a) if a[key] != b.get(key, "(absent)")]


def show(changes: list[tuple[str, Any, Any]], limit: int = 5) -> str:
    changes = sorted(changes, key=lambda c: not c[0].endswith(".name"))  # `model.name: tiny -> tiny_qwen2` first
    shown = "; ".join(f"{key}: {old} -> {new}" for key, old, new in changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in OUTPUTS)


def saved_work(folder: Path) -> str | None:
    """What a fresh start would replace: the newest checkpoint, else the final weights, else None."""
    root = folder / "checkpoints"
    steps = sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    if steps:
        return f"checkpoints ({', '.join(steps[-2:])})"
    if (folder / "model").exists():
        return "final weights (model/)"
    return None


def refuse_foreign(folder: Path) -> None:
    """A folder dsrun did not make (no Hydra snapshot, yet files in it) is the user's: never written into."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"hydra.run.dir={folder} is a file, not a folder; choose a new hydra.run.dir=...")
    if (folder / SNAPSHOT).is_file():
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                     if p.name not in STARTED and not RANK_LOG.fullmatch(p.name))
    if foreign:
        raise UserError(f"hydra.run.dir={folder} holds files dsrun did not write ({', '.join(foreign[:4])}"
                        f"{', ...' if len(foreign) > 4 else ''}) and no run snapshot (.hydra/config.yaml); a run "
                        "writes only into a new folder, an empty one or its own: choose a new hydra.run.dir=...")


def refuse_run_as_sweep_dir(folder: Path) -> None:
    """A sweep's trial folders and its multirun.yaml never go inside a run's folder."""
    if (folder / SNAPSHOT).is_file() or holds_run(folder):
        raise UserError(f"hydra.sweep.dir={folder} holds a run; a sweep writes its trials into a folder of its own: "
                        "choose a new hydra.sweep.dir=...")


def refuse_odd_files(folder: Path) -> None:
    """dsrun's own files in a run folder are plain files: a folder or device in their place would fail the run
    at its first write (a traceback), after it had started."""
    odd = [name for name in RUN_FILES if (folder / name).exists() and not (folder / name).is_file()]
    if odd:
        raise UserError(f"{folder}: {', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not a file, where the run "
                        "keeps its own; move it aside, or choose a new hydra.run.dir=...")


def check_folder(folder: Path, composed: dict[str, Any]) -> None:
    """What a sweep's trial folder must be before the sweep starts: new, empty, or this trial's own run."""
    refuse_foreign(folder)
    refuse_odd_files(folder)
    snapshot = folder / SNAPSHOT
    if snapshot.is_file() and holds_run(folder) and not composed.get("train", {}).get("overwrite"):
        old = read_yaml_mapping(snapshot, "restore the file, or choose a new hydra.sweep.dir")
        # a trial continues only its own run: with a changed learning rate it would report another trial's result
        if fixed := [change for change in config_diff(old, composed) if not change[0].startswith(SWEEP_RESUMABLE)]:
            raise UserError(f"hydra.sweep.dir: the trial folder {folder} holds a run with another config "
                            f"({show(fixed)}); choose a new hydra.sweep.dir=... (a trial folder continues only "
                            "the same trial)")


def nothing_to_continue(folder: Path, train: dict[str, Any], saved_every: Any) -> str | None:
    """Why a folder holding a run cannot be continued: a checkpoint was saved once (the run finished, a stop saved
    one, or a periodic save was due before its last logged step) but none is left, so continuing would retrain
    from step 1 over history a checkpoint held. None when it can: a run that never saved one (killed before its
    first was due, train.checkpoint_every=-1, diverged) starts again from step 1 -- as any resume replays the steps
    after its last save -- its old rows set aside, not dropped. `saved_every` is the snapshot's checkpoint_every."""
    if train.get("resume") not in (None, "auto") or saved_checkpoint(folder):
        return None
    metrics = folder / "metrics.jsonl"
    last = last_logged_step(metrics) if metrics.is_file() else 0
    every = saved_every if isinstance(saved_every, int) else 0
    status = summary_status(folder / "summary.json")
    saved = [reason for reason, held in (
        ("it finished: model/ holds its weights", (folder / "model").exists()),
        ("it finished (summary.json)", status == "completed"),
        ("it was stopped, which saves one (summary.json)", status == "interrupted" and every >= 0),
        (f"it logged step {last}, after its checkpoint at step {every} was due", 0 < every < last),
    ) if held]
    if not saved:
        if last:
            print(f"dsrun: note: {folder} stopped at step {last} without a checkpoint saved (train.checkpoint_every="
                  f"{every}); it starts again from step 1", file=sys.stderr)
        return None
    return (f"{folder} holds a trained run but no checkpoint to continue from: {saved[0]}, and checkpoints/ holds "
            "none now; continuing would retrain it from step 1 over its history: choose a new hydra.run.dir=..., "
            "resume from a checkpoint path with train.resume=PATH, or add train.overwrite=true to replace the run")


def summary_status(path: Path) -> str | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("status") if isinstance(summary, dict) else None


def last_logged_step(metrics: Path) -> int:
    """The highest step of metrics.jsonl's readable rows (a line cut by a kill is skipped)."""
    rows = (metrics_row(line) for line in metrics.read_text(errors="replace").splitlines())
    return max((row["step"] for row in rows if row is not None), default=0)


def saved_checkpoint(folder: Path) -> bool:
    root = folder / "checkpoints"
    return root.is_dir() and any(p.is_dir() for p in root.glob("step-*"))


def claim(folder: Path, composed: dict[str, Any], resolved: DictConfig, overrides: list[str]) -> list[str]:
    """Lock `folder` for this process and check that this job may write into it. Returns the Hydra overrides the
    job needs (a continuation must not rewrite the snapshot)."""
    refuse_foreign(folder)
    refuse_odd_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = lock(folder)
    if stale:
        print(f"dsrun: note: {folder} was locked by pid {stale.get('pid')} on {stale.get('host')} (since "
              f"{stale.get('time')}), which ended without releasing it (killed?); taking the folder over",
              file=sys.stderr)
    snapshot = folder / SNAPSHOT
    if not snapshot.is_file() or not holds_run(folder):
        return []  # a new folder, or one Hydra's snapshot alone (a sweep job, a run that died at start-up)
    train = composed.get("train", {})
    if train.get("overwrite"):
        replace(folder)
        return []
    fix = "restore the file, or choose a new hydra.run.dir"
    old = read_yaml_mapping(snapshot, fix)
    fixed = [change for change in config_diff(old, composed) if not resumable(change[0])]
    if fixed:
        raise UserError(f"hydra.run.dir={folder} holds a run with another config ({show(fixed)}); a run folder keeps "
                        "one run: choose a new hydra.run.dir=... (or add train.overwrite=true to replace that run, "
                        f"its checkpoints and weights); continuing it may change only {', '.join(RESUMABLE)}")
    if train.get("resume") == "never" and (work := saved_work(folder)):
        raise UserError(f"train.resume=never: {folder} holds {work} that starting over would replace; continue it "
                        f"with `dsrun resume {folder}`, choose a new hydra.run.dir=..., or add train.overwrite=true "
                        "to replace them")
    if problem := nothing_to_continue(folder, train, (old.get("train") or {}).get("checkpoint_every")):
        raise UserError(problem)
    check_global_batch(folder, resolved)
    changes = config_diff(old, composed)
    record_resume(folder, changes, overrides)
    print(f"dsrun: continuing the run in {folder}" + (f"; changed: {show(changes)}" if changes else "") +
          f" (recorded in {RESUMES})", file=sys.stderr)
    return ["hydra.output_subdir=null"]


def check_global_batch(folder: Path, resolved: DictConfig) -> None:
    """The checkpoint's data position and loss scale assume the global batch it was trained with."""
    path = folder / "config.yaml"
    if not path.is_file():
        return
    saved = OmegaConf.create(read_yaml_mapping(path, "restore the file, or choose a new hydra.run.dir"))
    try:
        before, now = global_batch(typed(saved)), global_batch(typed(resolved))  # a snapshot has the schema's keys
    except (AttributeError, KeyError, TypeError):  # an old or partial snapshot: nothing to compare against
        return
    if before != now:
        raise UserError(f"global batch {now} (train.micro_batch x train.accumulation x data-parallel): {folder} was "
                        f"trained with {before}; keep the product, e.g. a larger train.accumulation with fewer "
                        "processes")


def record_resume(folder: Path, changes: list[tuple[str, Any, Any]], overrides: list[str]) -> None:
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "overrides": overrides,
             "changed": {key: [old, new] for key, old, new in changes}, "git_commit": git_commit(),
             "host": platform.node(), "pid": os.getpid()}
    with (folder / RESUMES).open("a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")


def replace(folder: Path) -> None:
    """train.overwrite=true: the old run's outputs go, so nothing of it mixes with the new one."""
    for name in REPLACED:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    print(f"dsrun: train.overwrite=true: replaced the run in {folder}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The lock

def lock(folder: Path, name: str = LOCK, key: str = "hydra.run.dir") -> dict[str, Any] | None:
    """Hold `<folder>/.dsrun.lock` until this process ends (the kernel drops an flock when its holder dies, so a
    killed run never blocks the next). Returns the owner record a dead holder left behind, if any. A sweep's parent
    holds `.dsrun-sweep.lock` in the sweep folder the same way (`name`, `key`)."""
    if _held:
        return None  # this process already holds one (a run folder is claimed once per process)
    path = folder / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"{path}: cannot create the folder's lock ({exc.strerror}); choose a writable {key}") \
            from None
    if who := _flock_or_holder(fd, fcntl.LOCK_EX):
        raise UserError(f"{folder} is in use by {who} (lock {path}); wait for that {what_locks(key)} to end or stop "
                        f"it, or choose another {key}")
    stale = _owner(fd) or None
    me = {"pid": os.getpid(), "host": platform.node(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise UserError(f"{path}: cannot write the folder's lock ({exc.strerror}); free disk space or choose "
                        f"another {key}") from None
    _held.append(fd)
    atexit.register(_release, fd)
    return stale


def what_locks(key: str) -> str:
    return "sweep" if key == "hydra.sweep.dir" else "run"


def read_lock(folder: Path) -> None:
    """Export and generate read a run's weights: refused while a run writes them; the shared lock held until this
    process ends keeps a new writer out of the folder meanwhile. A folder without a lock file is not written to."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    if who := _flock_or_holder(fd, fcntl.LOCK_SH):
        raise UserError(f"{folder} is being written by {who} (lock {path}); its weights may be half written: wait "
                        "for that run to end")
    _readers.append(fd)  # closed when the process ends


def _flock_or_holder(fd: int, kind: int) -> str | None:
    """Take the lock `kind` on fd without waiting: None when taken; else fd is closed and the holder named."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return None
    except OSError:
        owner = _owner(fd)
        os.close(fd)
        return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('time')}" if owner else "another process"


def _owner(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return data if isinstance(data, dict) else {"pid": "?", "host": "?", "time": "?"}
    except ValueError:
        return {"pid": "?", "host": "?", "time": "?"}


def _release(fd: int) -> None:
    """An empty lock file is a released one; a non-empty one found free was left by a process that died."""
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    except OSError:
        pass
    if fd in _held:
        _held.remove(fd)
