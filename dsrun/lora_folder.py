"""A LoRA run's `model/` folder (the adapter, the tokenizer) as `model.init=pretrained model.path=<run>/model`:
the base is rebuilt as training built it (dsrun.model.merged_model) and the adapter merged into it. This module
only reads the folder; dsrun/model.py builds from it.

Where the base comes from: `base_model_name_or_path` in adapter_config.json, an absolute folder for a pretrained
base (a relative one is read relative to the adapter folder); absent for a random-init base, which the run's
config.yaml (one folder up) rebuilds from its seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeGuard

from dsrun.errors import UserError


def is_adapter_folder(path: str | Path | None) -> TypeGuard[str | Path]:
    return bool(path and (Path(path).expanduser() / "adapter_config.json").is_file())


def base_path(folder: Path) -> str | None:
    """The pretrained base of an adapter folder, absolute, or None (a random-init base)."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'adapter_config.json'}: cannot read it ({exc}); is this a run's model/ "
                        "folder?") from None
    if not base:
        return None
    path = Path(base).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def run_snapshot(folder: Path) -> Any:
    """The config of the run that trained the adapter, its base path made absolute."""
    from omegaconf import OmegaConf

    run_dir = folder.resolve().parent
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"model.path={folder}: a LoRA adapter outside its run folder (no {run_dir}/config.yaml); "
                        f"point model.path at <run>/model inside the run folder, or `dsrun export` the run first")
    snap = OmegaConf.load(run_dir / "config.yaml")
    if snap.model.init == "pretrained":
        snap.model.path = base_path(folder) or snap.model.path
    return snap


def absolute_base(model: Any) -> None:
    """Before saving an adapter: its base folder as an absolute path, so the folder loads from anywhere."""
    for peft_cfg in getattr(model, "peft_config", {}).values():
        base = peft_cfg.base_model_name_or_path
        if base and Path(base).expanduser().is_dir():
            peft_cfg.base_model_name_or_path = str(Path(base).expanduser().resolve())
