"""`dsrun export RUN_DIR OUT_DIR`: a finished run as a standard Hugging Face folder — LoRA merged into its base
(de-quantized first where the base was 4/8-bit), config, generation_config.json, tokenizer files with the chat
template, safetensors — that `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, `vllm serve OUT_DIR` and llama.cpp's
converter read as they are.

The base of a LoRA run is rebuilt exactly as training built it (model.merged_model: same seed, dtype, device type
and, for a quantized base, the same block-by-block creation), so random-init runs export too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dsrun.data import load_tokenizer
from dsrun.errors import UserError
from dsrun.model import merged_model


def export(run_dir: Path, out_dir: Path) -> Path:
    from transformers import GenerationConfig

    run_dir, out_dir = run_dir.expanduser().resolve(), out_dir.expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty; export into a new folder")
    model, snap = merged_model(run_dir)
    tokenizer = load_tokenizer(snap.model)
    model.config.use_cache = True
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop[0] if stop else None,
                         do_sample=True, temperature=0.6, top_p=0.95).save_pretrained(out_dir)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot write the export ({exc.strerror or exc})") from None
    print(f"dsrun: exported {run_dir} -> {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M "
          f"parameters, {next(model.parameters()).dtype})", file=sys.stderr)
    return out_dir


def export_task(cfg: Any) -> Path:
    """task=export task.source=RUN_DIR task.out=OUT_DIR (validate() requires both): the verb's work, the folder
    on stdout."""
    out = export(Path(cfg.task.source), Path(cfg.task.out))
    print(out)
    return out


def export_argv(argv: list[str]) -> int:
    """`dsrun export RUN_DIR OUT_DIR`."""
    if len(argv) != 2 or argv[0].startswith("-"):
        raise UserError("usage: dsrun export RUN_DIR OUT_DIR (a finished run folder, and a new folder for the "
                        "Hugging Face model)")
    print(export(Path(argv[0]), Path(argv[1])))
    return 0
