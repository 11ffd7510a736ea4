"""Frozen base weights in 8 or 4 bits (bitsandbytes), for QLoRA: every linear layer inside the transformer blocks
becomes a bitsandbytes layer; embeddings, the output head, norms, routers and 3-D expert tensors stay as they are.
Works on any model built by dsrun (random init or loaded), on CUDA and on CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsrun.parallelize import decoder_blocks

COMPUTE_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def quantize(model: nn.Module, quant_cfg: Any, precision_mode: str) -> nn.Module:
    if quant_cfg.method == "none":
        return model
    for block in decoder_blocks(model):
        quantize_block(block, quant_cfg, precision_mode)
    for param in model.parameters():  # the base is frozen; adapters are added afterwards
        param.requires_grad_(False)
    return model


def quantize_block(block: nn.Module, quant_cfg: Any, precision_mode: str) -> None:
    """Swap one transformer block's linear layers for bitsandbytes layers, quantized on the device their weights are
    on (inference loads a large model block by block onto the GPU this way, never holding it whole in 16 bits)."""
    import bitsandbytes as bnb

    compute = COMPUTE_DTYPE.get(precision_mode, torch.float32)
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            device, weight = child.weight.device, child.weight.data
            if quant_cfg.method == "nf4":
                # the storage dtype is uint8: these layers are for single/DDP, never sharded (PITFALLS: QLoRA)
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute, compress_statistics=quant_cfg.double_quant,
                                          quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=quant_cfg.double_quant)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # quantizes on the move
