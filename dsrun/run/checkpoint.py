"""Atomic checkpoints and resume.

Layout: <run>/checkpoints/step-00000050/{state, rng-rank<r>.pt, COMPLETE} and <run>/checkpoints/latest (the name of
the newest complete one); with train.keep_best also <run>/checkpoints/best (the lowest eval loss so far; its
COMPLETE holds its step). A checkpoint is written under `step-N.incomplete`, every rank finishes, files are
fsynced, the folder is renamed and only then `latest` is replaced (write + fsync + rename): a crash at any
moment leaves the previous checkpoint and pointer intact. `state` is what Fabric writes for the strategy: one
file for single/DDP, a sharded torch.distributed.checkpoint folder for FSDP2/TP (resharded on load when the
number of processes changes), DeepSpeed's own folder for ZeRO.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dsrun.errors import UserError
from dsrun.safe_read import LOAD_ERRORS, reason, read_text, torch_load

LATEST = "latest"
COMPLETE = "COMPLETE"
STEP_NAME = re.compile(r"step-\d{8}")


class Checkpointer:
    def __init__(self, fabric: Any, run_dir: Path, keep: int, adapter_only: bool = False):
        self.fabric = fabric
        self.root = run_dir / "checkpoints"
        self.keep = keep
        # LoRA: the frozen base is rebuilt from its source (seeded init or the weights folder); save the adapters
        self.filter = {"model": lambda name, _: "lora_" in name} if adapter_only else None

    # --- find -----------------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    # --- save -----------------------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], name: str | None = None) -> Path:
        """`name` (e.g. "best") writes a checkpoint beside the step folders: not `latest`, never pruned."""
        fabric, rank0 = self.fabric, self.fabric.global_rank == 0
        final = self.root / (name or f"step-{step:08d}")
        tmp = final.with_name(final.name + ".incomplete")
        try:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a crash mid-save
                tmp.mkdir(parents=True)
            fabric.barrier()
            fabric.save(tmp / "state", state, filter=self.filter)
            torch.save(rng_state(), tmp / f"rng-rank{fabric.global_rank}.pt")
            _fsync_tree(tmp)
            fabric.barrier()
            if rank0:
                (tmp / COMPLETE).write_text(f"{step}\n")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _fsync_dir(self.root)
                if name is None:
                    _write_atomic(self.root / LATEST, final.name + "\n")
                    self._prune()
        except OSError as exc:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = f"; {last_checkpoint_note(self.root.parent)}"
            raise UserError(f"checkpoint at step {step}: cannot write {tmp} ({exc.strerror or exc}){kept}; "
                            "free disk space or point hydra.run.dir at a writable folder") from None
        fabric.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # --- load -----------------------------------------------------------------------------------------------

    def load(self, folder: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Restore `state` in place (model, optimizer); returns the rest of what was saved."""
        if not (folder / COMPLETE).is_file():
            raise UserError(f"train.resume={folder}: not a complete dsrun checkpoint (no {COMPLETE} marker)")
        try:
            remainder = self.fabric.load(folder / "state", state, strict=self.filter is None)
        except LOAD_ERRORS as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else reason(exc)
            raise UserError(f"checkpoint {folder}: cannot load it into this model and strategy ({first[:300]}); "
                            "was it written by another model or config, or damaged? Resume from another checkpoint "
                            "(train.resume=<its path>) or train in a new folder (hydra.run.dir=...)") from None
        rng_file = folder / f"rng-rank{self.fabric.global_rank}.pt"
        if rng_file.is_file():  # absent when resuming with more processes than wrote it
            rng = torch_load(rng_file, "resume from another checkpoint (train.resume=<its path>); without this "
                             "file the resumed run would not draw the same random numbers")
            try:
                set_rng_state(rng)
            except (KeyError, TypeError, RuntimeError, ValueError) as exc:
                raise UserError(f"{rng_file}: not an RNG state dsrun wrote ({reason(exc)}); resume from another "
                                "checkpoint (train.resume=<its path>)") from None
        return remainder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint `<run>/checkpoints/latest` names; None when there is no pointer. A pointer that is
    damaged or names no complete checkpoint is a user error (which other checkpoints exist is in the message)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    others = ", ".join(p.name for p in complete_checkpoints(root)) or "none"
    fix = (f"write the name of a complete checkpoint into it (complete here: {others}), or set "
           "train.resume=<path of a checkpoint>")
    name = read_text(pointer, fix).strip()
    if not STEP_NAME.fullmatch(name):
        raise UserError(f"{pointer}: damaged, holds {name[:40]!r} instead of a checkpoint name like step-00000050; "
                        f"{fix}")
    if not (root / name / COMPLETE).is_file():
        raise UserError(f"{pointer}: points at {name}, which is not a complete checkpoint; {fix}")
    return root / name


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def last_checkpoint_note(run_dir: Path) -> str:
    """What a message may say about the run's checkpoints: the newest complete one by name, or that none exists.
    Read from the disk at the moment of the message, never assumed."""
    try:
        found = latest_checkpoint(run_dir)
    except UserError:
        found = None
    complete = complete_checkpoints(Path(run_dir) / "checkpoints")
    found = found or (complete[-1] if complete else None)
    if found is None:
        return "no complete checkpoint exists in this run"
    return f"the last complete checkpoint ({found}) is intact"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
