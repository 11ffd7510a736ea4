"""Adapters trained on a frozen base (the `adapter` group). ADAPTERS is the adapter.method registry: adding one is
conf/adapter/<option>.yaml and one entry there. peft and torch load only when an adapter is added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List

from dsrun.errors import UserError
from dsrun.lm import CausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class AdapterConfig:
    name: str = "none"
    method: str = "none"  # none | lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


def _none(model: PreTrainedModel, adapter_cfg: AdapterConfig) -> CausalLM:
    return model


def _lora(model: PreTrainedModel, adapter_cfg: AdapterConfig) -> CausalLM:
    import torch
    from peft import LoraConfig, get_peft_model

    targets = list(adapter_cfg.target_modules)
    if targets != ["all-linear"]:
        head = model.get_output_embeddings()
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head})
        if missing := [t for t in targets if t not in names]:
            raise UserError(f"adapter.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                            f"{', '.join(names)} (or all-linear)")
    lora = LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    # adapter weights (and so their optimizer states) in fp32 over a 16-bit frozen base
    return get_peft_model(model, lora, autocast_adapter_dtype=True)


ADAPTERS: dict[str, Callable[..., CausalLM]] = {"none": _none, "lora": _lora}


def add_adapters(model: PreTrainedModel, adapter_cfg: AdapterConfig) -> CausalLM:
    return ADAPTERS[adapter_cfg.method](model, adapter_cfg)
