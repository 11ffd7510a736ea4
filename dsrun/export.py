"""`dsrun export RUN_DIR OUT_DIR`: a finished run as a standard Hugging Face folder — LoRA merged into its base
(de-quantized first where the base was 4/8-bit), config, generation_config.json, tokenizer files with the chat
template, safetensors — that `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, `vllm serve OUT_DIR` and llama.cpp's
converter read as they are.

The base of a LoRA run is rebuilt exactly as training built it (model.merged_model: same seed, dtype, device type
and, for a quantized base, the same block-by-block creation), so random-init runs export too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from dsrun.data import load_tokenizer
from dsrun.errors import UserError
from dsrun.model import merged_model, written_whole
from dsrun.quiet import quiet_warnings
from dsrun.run.folder import read_lock

if TYPE_CHECKING:
    from dsrun.schema import RunConfig


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_DTYPE = "bfloat16"  # what servers load and the Hub's R1 distills ship; half a float32 run's size


def export(run_dir: Path, out_dir: Path, dtype: str = DEFAULT_DTYPE) -> Path:
    from transformers import GenerationConfig

    run_dir, out_dir = run_dir.expanduser().resolve(), out_dir.expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty; export into a new folder")
    read_lock(run_dir)
    model, snap = merged_model(run_dir, DTYPES[dtype])
    trained = trained_dtype(run_dir)
    tokenizer = load_tokenizer(snap.model)
    model.config.use_cache = True
    # no half-written model where a server would load it (model.written_whole)
    try:
        with written_whole(out_dir, out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}") as partial:
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop[0] if stop else None,
                             do_sample=True, temperature=0.6, top_p=0.95).save_pretrained(partial)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
        raise UserError(f"{out_dir}: cannot write the export ({why}); nothing was left there") from None
    note = (f"; the run's weights are {trained}: `dsrun export RUN OUT --dtype {trained}` keeps them so"
            if trained and trained != dtype else "")
    print(f"dsrun: exported {run_dir} -> {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M "
          f"parameters in {dtype}{note})", file=sys.stderr)
    return out_dir


def trained_dtype(run_dir: Path) -> str | None:
    """The dtype the run saved its weights in (model/config.json), or None where it does not say."""
    import json

    try:
        config = json.loads((run_dir / "model" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = config.get("dtype") or config.get("torch_dtype")
    return found if found in DTYPES else None


def export_task(cfg: RunConfig) -> Path:
    """task=export task.source=RUN_DIR task.out=OUT_DIR (validate() requires both): the verb's work, the folder
    on stdout."""
    assert cfg.task.source and cfg.task.out  # validate() requires both
    out = export(Path(cfg.task.source), Path(cfg.task.out))
    print(out)
    return out


def export_argv(argv: list[str]) -> int:
    """`dsrun export RUN_DIR OUT_DIR [--dtype bfloat16|float16|float32]`."""
    dtype = DEFAULT_DTYPE
    if "--dtype" in argv:
        at = argv.index("--dtype")
        dtype = argv[at + 1] if at + 1 < len(argv) else ""
        argv = argv[:at] + argv[at + 2:]
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if len(argv) != 2 or argv[0].startswith("-"):
        raise UserError("usage: dsrun export RUN_DIR OUT_DIR [--dtype bfloat16|float16|float32] (a finished run "
                        "folder, and a new folder for the Hugging Face model)")
    with quiet_warnings():
        print(export(Path(argv[0]), Path(argv[1]), dtype))
    return 0
