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
import shutil
from pathlib import Path
from typing import Any

import torch

from dsrun.errors import UserError

LATEST = "latest"
COMPLETE = "COMPLETE"


class Checkpointer:
    def __init__(self, fabric: Any, run_dir: Path, keep: int, adapter_only: bool = False):
        self.fabric = fabric
        self.root = run_dir / "checkpoints"
        self.keep = keep
        # LoRA: the frozen base is rebuilt from its source (seeded init or the weights folder); save the adapters
        self.filter = {"model": lambda name, _: "lora_" in name} if adapter_only else None

    # --- find -----------------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        if not (folder / COMPLETE).is_file():
            raise UserError(f"{pointer}: points at {folder.name}, which is not a complete checkpoint; remove the "
                            "pointer to start over, or set train.resume=<path of another checkpoint>")
        return folder

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
            previous = self.root / LATEST
            kept = f"; the previous checkpoint ({previous.read_text().strip()}) is intact" if previous.is_file() else ""
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
        except (RuntimeError, KeyError, ValueError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint {folder}: cannot load it into this model and strategy ({first[:300]}); "
                            "was it written by another model or config? Start over with train.resume=never") from None
        rng_file = folder / f"rng-rank{self.fabric.global_rank}.pt"
        if rng_file.is_file():  # absent when resuming with more processes than wrote it
            set_rng_state(torch.load(rng_file, weights_only=True))
        return remainder


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
