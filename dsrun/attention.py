"""Attention over packed documents without a `tokens x tokens` mask.

transformers turns position ids that restart at 0 into an explicit 4-D mask, and a mask takes SDPA off its flash
and cuDNN kernels (masked packing ran at 0.91x unmasked packing on an H200, BENCHMARKS.md). Here the document
bounds are computed once per micro-batch on the host from the position ids (`document_bounds`, before the batch
moves to the GPU: no device sync) and handed to each attention layer as transformers' flash-attention keyword
arguments (`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`). On CUDA the layers run PyTorch's variable-length flash
attention (`torch.nn.attention.varlen`); elsewhere, or where that kernel does not apply, SDPA with a
block-diagonal causal mask built from the same bounds (what transformers computes, done once per layer call).

The implementation is registered with transformers' AttentionInterface only, not its mask interface, so the
model builds no mask of its own (and does not look for packed sequences in the position ids, a host sync).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "dsrun_varlen"
_KERNEL: tuple[Any, bool] | None = None  # (torch's varlen_attn, whether it takes grouped KV heads), once registered


def document_bounds(positions: torch.Tensor) -> torch.Tensor:
    """Cumulative document offsets over the flattened [rows, seq] batch, int32. A document starts where its
    position id is 0 and at the start of every row."""
    flat = positions.reshape(-1)
    starts = flat == 0
    starts[:: positions.shape[-1]] = True
    return torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)


def batch_kwargs(positions: torch.Tensor | None, device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for one micro-batch: position ids, and the document bounds where documents
    restart their positions. `positions` is the host tensor, before the batch moves to `device`."""
    if positions is None:
        return {}
    offsets = document_bounds(positions).to(device, non_blocking=True)
    # the row length bounds every document: a constant, so a compiled block sees the same value every batch (the
    # longest document would change each time and recompile it); the kernel's extra tiles exit at once
    row = positions.shape[-1]
    return {"position_ids": positions.to(device, non_blocking=True), "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets, "max_length_q": row, "max_length_k": row}


def _varlen() -> tuple[Any, bool] | None:
    """PyTorch's varlen flash attention and whether it takes grouped KV heads and a causal window (torch >= 2.12)
    or only equal heads and `is_causal` (2.10-2.11); None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor, longest: int,
           scale: float | None) -> torch.Tensor | None:
    """[tokens, heads, dim] inputs -> [tokens, heads, dim], or None where the kernel does not apply."""
    if _KERNEL is None or query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    varlen_attn, grouped = _KERNEL
    if grouped:
        return varlen_attn(query, key, value, offsets, offsets, longest, longest, scale=scale, window_size=(-1, 0),
                           enable_gqa=key.shape[1] != query.shape[1])
    if value.shape[-1] != query.shape[-1] or (scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-9):
        return None  # the older kernel takes neither a narrower value head (MLA) nor a scale
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    return varlen_attn(query, key, value, offsets, offsets, longest, longest, is_causal=True)


def document_mask(offsets: torch.Tensor, rows: int, seq: int) -> torch.Tensor:
    """[rows, 1, seq, seq] bool: causal within each document, nothing across documents."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    document = torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths).view(rows, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=offsets.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [rows, heads, seq, dim], key/value [rows, kv_heads, seq, dim];
    returns [rows, seq, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:  # one sequence per row (evaluation without packing, a plain call): causal SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, seq, _ = query.shape
    if not (dropout and module.training):
        flat = [t.transpose(1, 2).reshape(rows * seq, t.shape[1], t.shape[-1]) for t in (query, key, value)]
        out = _flash(*flat, cu_seq_lens_q, max_length_q or seq, scaling)
        if out is not None:
            return out.view(rows, seq, heads, out.shape[-1]), None
    mask = document_mask(cu_seq_lens_q, rows, seq)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Route the model's attention through `varlen_attention` (registered once with transformers)."""
    from transformers import AttentionInterface

    global _KERNEL
    _KERNEL = _varlen()  # looked up once, not inside a compiled block
    AttentionInterface.register(NAME, varlen_attention)
    model.set_attn_implementation(NAME)
