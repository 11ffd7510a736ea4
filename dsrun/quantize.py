"""Frozen base weights in 8 or 4 bits (bitsandbytes), for QLoRA: every linear layer inside the transformer blocks
becomes a bitsandbytes layer; embeddings, the output head, norms, routers and 3-D expert tensors stay as they are
(in 16 bits: model.weight_dtype). model.build_model calls this block by block as the blocks are created.
Works on CUDA and on CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def quantize_linears(module: nn.Module, quant_cfg: Any, compute_dtype: torch.dtype) -> None:
    """Replace every plain nn.Linear inside `module` by its bitsandbytes form, quantized where its weight lives."""
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            device, weight = child.weight.device, child.weight.data
            if quant_cfg.method == "nf4":
                # uint8 storage: these layers are for single/DDP; FSDP2 and ZeRO cannot shard them safely
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=quant_cfg.double_quant,
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
