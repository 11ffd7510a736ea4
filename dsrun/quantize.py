"""Frozen base weights in 8 or 4 bits (bitsandbytes), for QLoRA: every linear layer inside the transformer blocks
becomes a bitsandbytes layer; embeddings, the output head, norms, routers and 3-D expert tensors stay as they are
(in 16 bits: model.weight_dtype). model.build_model calls this block by block as the blocks are created; real
weights are quantized by transformers as they load, with the settings of bnb_config (the same layers).
Works on CUDA and on CPU.

The quant.method registry is QUANT_METHODS: adding a method is conf/quant/<option>.yaml and one entry there (its
layer, and transformers' loading settings for it). torch and bitsandbytes load only when a model is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class QuantConfig:
    name: str = "none"
    method: str = "none"  # none | int8 | nf4
    double_quant: bool = True


def _no_constants(quant: QuantConfig) -> float:
    return 0.0


def _nf4_constants(quant: QuantConfig) -> float:
    """One absmax per 64 weights: fp32, or with double quantization 8-bit plus one fp32 per 256 of those."""
    return (1 / 64 + 4 / (64 * 256)) if quant.double_quant else 4 / 64


@dataclass(frozen=True)
class Method:
    """One quant.method: how its layers are built and loaded, and the sizes the planner counts."""

    layer: Callable[..., Any]  # (nn.Linear, quant config, compute dtype) -> its bitsandbytes layer, on meta
    loading: Callable[..., Any]  # (quant config, compute dtype) -> transformers' BitsAndBytesConfig
    weight_bytes: float  # bytes per quantized weight
    constant_bytes: Callable[[Any], float] = _no_constants  # quant config -> constants' bytes per weight
    row_constant_bytes: float = 0.0  # constants' bytes per output row (int8: one fp32 scale a row)
    # the planner's factor on 16-bit matmul throughput (dequantize before each matmul; H100 anchor: stock QLoRA at
    # 12 % MFU against 32 % dense)
    compute_efficiency: float = 1.0


def _nf4_layer(child: nn.Linear, quant: QuantConfig, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    # uint8 storage: these layers are for single/DDP; FSDP2 and ZeRO cannot shard them safely
    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=quant.double_quant,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=quant.double_quant)
    return layer


def _int8_layer(child: nn.Linear, quant: QuantConfig, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
    layer.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
    return layer


def _nf4_loading(quant: QuantConfig, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=quant.double_quant)


def _int8_loading(quant: QuantConfig, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


QUANT_METHODS: dict[str, Method | None] = {
    "none": None,
    "int8": Method(_int8_layer, _int8_loading, weight_bytes=1.0, row_constant_bytes=4.0, compute_efficiency=0.3),
    "nf4": Method(_nf4_layer, _nf4_loading, weight_bytes=0.5, constant_bytes=_nf4_constants,
                  compute_efficiency=0.4),
}


def quantize_linears(module: nn.Module, quant_cfg: QuantConfig, compute_dtype: torch.dtype) -> None:
    """Replace every plain nn.Linear inside `module` by its bitsandbytes form, quantized where its weight lives."""
    from torch import nn

    method = QUANT_METHODS[quant_cfg.method]
    assert method is not None, "quant.method=none quantizes no layer"
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer = method.layer(child, quant_cfg, compute_dtype)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device))  # quantizes on the move


def bnb_config(quant_cfg: QuantConfig, compute_dtype: torch.dtype) -> Any:
    """transformers' bitsandbytes settings for loading real weights: the same layers quantize_linears makes,
    quantized as each weight is loaded."""
    method = QUANT_METHODS[quant_cfg.method]
    assert method is not None, "quant.method=none loads the weights as they are"
    return method.loading(quant_cfg, compute_dtype)
