"""Model: build from architecture fields (random init) or load real weights, add adapters, count FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsrun.errors import UserError


def architecture(model_cfg: Any):
    """The transformers config of a model option, offline: from its fields, or the config.json of its weights."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    if model_cfg.init == "pretrained":
        source = _weights_source(model_cfg)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            if "trust_remote_code" in str(exc):
                raise UserError(f"model.path={source}: this model runs code shipped with its weights; read that code, "
                                "then set model.trust_remote_code=true to allow it") from None
            raise UserError(f"model.path={source}: cannot read its config.json: {str(exc).splitlines()[0]}") from None
    else:
        fields = OmegaConf.to_container(model_cfg.fields, resolve=True) if not isinstance(model_cfg.fields, dict) \
            else dict(model_cfg.fields)
        try:
            config = AutoConfig.for_model(model_cfg.arch, **fields)
        except Exception as exc:  # noqa: BLE001 - every failure here comes from the user's fields
            detail = str(exc.__cause__ or exc).strip().splitlines()[-1].strip()
            raise UserError(f"model.fields of model={model_cfg.name}: {detail}") from None
    if model_cfg.experts_implementation and hasattr(config, "n_routed_experts"):
        config.experts_implementation = model_cfg.experts_implementation
    config.use_cache = False
    return config


def _weights_source(model_cfg: Any) -> str:
    """A local folder when model.path is set (checked), else the hub id (needs the HF cache or network)."""
    if model_cfg.path:
        folder = Path(model_cfg.path).expanduser()
        if not folder.is_dir():
            raise UserError(f"model.path={folder}: no such folder; point it at a folder with config.json and "
                            "*.safetensors")
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path={folder}: no config.json in it; is this a Hugging Face model folder?")
        from dsrun.safe_read import read_json_object

        fix = "restore it from the model's source (it describes the architecture)"
        if "model_type" not in read_json_object(folder / "config.json", fix):
            raise UserError(f"{folder / 'config.json'}: no model_type in it; {fix}")
        return str(folder)
    return model_cfg.hub_id


def build_model(model_cfg: Any, config: Any, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of `config` (from architecture()): random weights (seeded, identical on every rank) or the
    real ones from safetensors, created in `dtype`, the dtype its weights train in (weight_dtype())."""
    from transformers import AutoModelForCausalLM

    if model_cfg.init == "pretrained":
        source = _weights_source(model_cfg)
        if model_cfg.path and not any(Path(source).glob("*.safetensors")):
            raise UserError(f"model.path={source}: no *.safetensors weights in it (dsrun does not unpickle .bin files)")
        if model_cfg.path:
            from dsrun.safe_read import check_safetensors

            check_safetensors(Path(source))
        return AutoModelForCausalLM.from_pretrained(
            source, config=config, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True,
            dtype=dtype)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def weight_dtype(precision_mode: str) -> torch.dtype:
    """bf16-true weights are created in bf16: building them in fp32 and casting afterwards peaks at 1.5x the
    weights (a 1.5B model reached 7.1 GiB on an 8 GB card before its first step)."""
    return torch.bfloat16 if precision_mode == "bf16-true" else torch.float32


def add_adapters(model: torch.nn.Module, adapter_cfg: Any) -> torch.nn.Module:
    if adapter_cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(adapter_cfg.target_modules)
    lora = LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def numel(p: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (ds_numel)."""
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    embedding = sum(numel(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "trainable": trainable, "embedding": embedding}


def active_matmul_params(model: torch.nn.Module) -> int:
    """Parameters one token passes through, less the input embedding (a lookup, not a matmul): for MoE only
    num_experts_per_tok of the routed experts count."""
    config = model.config
    total = sum(numel(p) for p in model.parameters())
    embedding = numel(model.get_input_embeddings().weight)
    routed = sum(numel(p) for n, p in model.named_parameters() if ".mlp.experts." in n)
    n_routed = getattr(config, "n_routed_experts", None) or 0
    inactive = routed * (n_routed - config.num_experts_per_tok) / n_routed if n_routed else 0
    return int(total - embedding - inactive)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, the anchors' formula (nanoGPT's estimate_mfu, PaLM appendix B):
    6 x active non-embedding params + 12 x layers x hidden x seq_len."""
    config = model.config
    return 6 * active_matmul_params(model) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def save_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Final weights as safetensors (+ config.json), loadable with model.init=pretrained model.path=<folder>."""
    from safetensors import SafetensorError

    from dsrun.checkpoint import last_checkpoint_note

    try:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    except (OSError, SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:160]
        note = last_checkpoint_note(folder.parent)
        then = (f"free disk space, then `dsrun resume {folder.parent}` writes them from it" if not note.startswith("no")
                else "the trained weights are lost with this process: free disk space and train again")
        raise UserError(f"{folder}: cannot write the final weights ({why}); {note}; {then}") from None
