"""`dsrun export RUN_DIR OUT_DIR`: a finished run as a standard Hugging Face folder — LoRA merged into its base
(de-quantized first where the base was 4/8-bit), config, generation_config.json, tokenizer files with the chat
template, safetensors — that `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, `vllm serve OUT_DIR` and llama.cpp's
converter read as they are.

The base of a LoRA run is rebuilt exactly as training built it (model.build_run_model: same seed, dtype, device
type and, for a quantized base, the same block-by-block creation), so random-init runs export too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from dsrun.errors import UserError


def read_run(run_dir: Path) -> Any:
    """The run's resolved config; a folder that is not a finished run is one line."""
    from omegaconf import OmegaConf

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); pass a folder `python -m dsrun` wrote")
    if not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir}: the run saved no final weights (no model/); finish it with "
                        f"`dsrun resume {run_dir}`, then export")
    return OmegaConf.load(run_dir / "config.yaml")


def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every bitsandbytes layer back to a plain nn.Linear holding its dequantized weight: the weight the
    adapters were trained against."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                continue
            state = getattr(child.weight, "quant_state", None) or getattr(child, "state", None)
            weight = dequantize_bnb_weight(child.weight, state=state).to(dtype)
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            linear.weight.data.copy_(weight)
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.data.to(dtype))
            setattr(parent, name, linear)
    return model


def merged_model(run_dir: Path, dtype: torch.dtype = torch.bfloat16, snap: Any = None) -> tuple[torch.nn.Module, Any]:
    """The run's final model in `dtype` with any LoRA adapter merged, and the run's config (`snap`: that config
    with its base path made absolute, dsrun/lora_folder.py)."""
    from transformers import AutoModelForCausalLM

    from dsrun.model import architecture, build_run_model

    snap = snap if snap is not None and (run_dir / "model").is_dir() else read_run(run_dir)
    weights = run_dir / "model"
    if not (weights / "adapter_config.json").is_file():
        try:
            return AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, use_safetensors=True), snap
        except (OSError, ValueError) as exc:
            raise UserError(f"{weights}: cannot load the run's weights: {str(exc).splitlines()[0]}") from None
    from peft import PeftModel

    device = torch.device("cuda" if snap.hardware.accelerator == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available() and snap.model.init == "random":
        raise UserError(f"{run_dir}: a LoRA adapter over a random-init base built on a GPU; that base is rebuilt "
                        "from the same random numbers only on a GPU: run this on a GPU machine")
    snap.model.experts_implementation = "eager" if device.type == "cpu" else snap.model.experts_implementation
    with torch.device(device):  # where training created the base: random init draws from that device's generator
        base = build_run_model(snap, architecture(snap.model), device)
    merged = PeftModel.from_pretrained(dequantize(base, dtype).to(dtype), weights).merge_and_unload()
    return merged.to(dtype), snap


def export(run_dir: Path, out_dir: Path) -> Path:
    from transformers import GenerationConfig

    from dsrun.data import load_tokenizer

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


def export_argv(argv: list[str]) -> int:
    """`dsrun export RUN_DIR OUT_DIR`."""
    if len(argv) != 2 or argv[0].startswith("-"):
        raise UserError("usage: dsrun export RUN_DIR OUT_DIR (a finished run folder, and a new folder for the "
                        "Hugging Face model)")
    print(export(Path(argv[0]), Path(argv[1])))
    return 0
