"""The run folder: resolved config, environment snapshot (secrets redacted), summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import dsrun

SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
ENV_PREFIXES = ("NCCL_", "GLOO_", "CUDA_", "TORCH_", "PYTORCH_", "OMP_", "MKL_", "HF_", "TRANSFORMERS_", "WANDB_",
                "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_", "DSRUN_", "LD_LIBRARY_PATH",
                "THP_MEM_ALLOC_ENABLE")
REDACTED = "<redacted>"


def metrics_row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line as its row: a JSON object with an integer step, else None (a line a kill cut short)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def run_dir() -> Path:
    """The folder Hydra made for this job; every rank of a Fabric launch gets the same one."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def rank_zero() -> bool:
    """Before Fabric starts, whether this process is the first of its run (Fabric, torchrun and SLURM each name
    it differently); rank 0 owns the run folder, the ledger record and the console."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def redact_env(environ: dict[str, str]) -> dict[str, str]:
    """Relevant variables; the value of anything whose name says it is a secret is replaced."""
    kept = {}
    for name, value in sorted(environ.items()):
        secret = any(marker in name.upper() for marker in SECRET_MARKERS)
        if secret or name.upper().startswith(ENV_PREFIXES):
            kept[name] = REDACTED if secret else value
    return kept


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "dsrun": dsrun.__version__,
        "git_commit": git_commit(),
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "env": redact_env(dict(os.environ)),
    }


def snapshot(cfg: DictConfig, folder: Path) -> None:
    """Resolved config and environment, written once by rank 0 before the run's first start. A continuation keeps
    them: what it changed is in resumes.jsonl (dsrun/run/folder.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.yaml").is_file():
        return
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(folder / "env.json", environment())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary name so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
