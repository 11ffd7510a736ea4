"""The model, counted exactly on the meta device (no memory, well under a second even for 671 B parameters)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsrun.errors import UserError
from dsrun.plan.assumptions import TP_PROJECTIONS
from dsrun.plan.overrides import boxed

if TYPE_CHECKING:
    from dsrun.families import ModelConfig


@dataclass(frozen=True)
class Shape:
    model: Any  # on the meta device; flops_per_token() reads it
    total: int
    embedding: int
    head: int  # 0 when tied to the embedding
    matmul: int  # every linear and expert weight but the head: what int8/nf4 quantize
    matmul_rows: int  # their output rows (int8 keeps one fp32 scale per row)
    routed: int  # routed-expert weights, all experts
    active: int  # parameters one token multiplies with (model.active_matmul_params)
    tp: int  # weights tensor parallel splits
    block: int  # parameters of the largest decoder block: what FSDP / ZeRO-3 gathers at once
    block_matmul: int
    moe_blocks: tuple[bool, ...]
    linears: tuple[tuple[str, int, int, int], ...]  # (leaf name, in + out, block, in_features): LoRA's targets
    cache: dict = field(default_factory=dict, compare=False, hash=False)


def model_shape(model_cfg: ModelConfig) -> Shape:
    box, keys = boxed(model_cfg), ("arch", "init", "path", "hub_id", "trust_remote_code", "fields")
    return _shape(json.dumps({k: box[k] for k in keys}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _shape(key: str) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    from dsrun.families import ModelConfig
    from dsrun.model import active_matmul_params, architecture
    from dsrun.parallelize import decoder_blocks

    spec = ModelConfig(name="planned", **json.loads(key))
    try:
        config = architecture(spec)
    except OSError as exc:
        raise UserError(f"model.init=pretrained: cannot read the config.json of {spec.path or spec.hub_id} offline "
                        f"({str(exc).splitlines()[0]}); set model.path to a local folder, or plan with "
                        "model.init=random (the plan needs only the architecture)") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head_module = model.get_input_embeddings(), model.get_output_embeddings()
    blocks = decoder_blocks(model)
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    matmul, rows, tp, routed, linears = 0, 0, 0, 0, []
    block_matmul = [0] * len(blocks)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head_module:
            i = block_of.get(id(module.weight), -1)
            linears.append((name.rsplit(".", 1)[-1], module.in_features + module.out_features, i, module.in_features))
            matmul += module.weight.numel()
            rows += module.out_features
            tp += module.weight.numel() if name.endswith(TP_PROJECTIONS) else 0
            block_matmul[i] += module.weight.numel() if i >= 0 else 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:  # 3-D (experts, out, in) tensors
            routed += p.numel()
            matmul += p.numel()
            rows += p.shape[0] * p.shape[1]
            block_matmul[block_of[id(p)]] += p.numel()
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    largest = max(range(len(blocks)), key=sizes.__getitem__)
    tied = head_module.weight is embed.weight
    return Shape(model=model, total=sum(p.numel() for p in model.parameters()), embedding=embed.weight.numel(),
                 head=0 if tied else head_module.weight.numel(), matmul=matmul, matmul_rows=rows, routed=routed,
                 active=active_matmul_params(model), tp=tp, block=sizes[largest],
                 block_matmul=block_matmul[largest],
                 moe_blocks=tuple(any(".experts." in n for n, _ in b.named_parameters()) for b in blocks),
                 linears=tuple(linears))
