"""Attention over packed documents without a `tokens x tokens` mask.

transformers turns position ids that restart at 0 into an explicit 4-D mask, and a mask takes SDPA off its flash
and cuDNN kernels (masked packing ran at 0.91x unmasked packing on an H200, BENCHMARKS.md). Here the document
bounds are computed once per micro-batch on the host from the position ids (`document_bounds`, before the batch
moves to the GPU: no device sync) and handed to each attention layer as transformers' flash-attention keyword
arguments (`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`). On CUDA the layers run PyTorch's variable-length flash
attention (ATen's, under `torch.nn.attention.varlen`); elsewhere, or where that kernel does not apply, SDPA with a
block-diagonal causal mask built from the same bounds (what transformers computes, done once per layer call).

The implementation is registered with transformers' AttentionInterface only, not its mask interface, so the
model builds no mask of its own (and does not look for packed sequences in the position ids, a host sync).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NAME = "dsrun_varlen"
_KERNEL: Any | None = None  # the varlen flash kernel (_varlen), looked up once when registered


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


def _varlen() -> Any | None:
    """The variable-length flash kernel, or None where this torch build has none (CPU-only builds).

    ATen's `_flash_attention_forward` (with its backward) is what `torch.nn.attention.varlen.varlen_attn` wraps; it
    is called directly because the public wrapper takes grouped KV heads only from torch 2.12 (2.11 would need K and
    V copied per query head: measured on an H200, the copies cost more than the mask saves)."""
    kernel = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return kernel if kernel is not None and torch.backends.cuda.is_flash_attention_available() else None


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor, longest: int,
           scale: float | None) -> torch.Tensor | None:
    """[rows, heads, seq, dim] inputs (kv heads may be fewer) -> [rows, seq, heads, dim], or None where the kernel
    does not apply (checked before anything is copied)."""
    if _KERNEL is None or query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    if value.shape[-1] != query.shape[-1]:
        return None  # flash takes no narrower value head (MLA): the SDPA fallback
    rows, heads, seq, _ = query.shape
    flat = [t.transpose(1, 2).reshape(rows * seq, t.shape[1], t.shape[-1]) for t in (query, key, value)]
    out = _KERNEL(*flat, offsets, offsets, longest, longest, 0.0, True, False, scale=scale)[0]
    return out.view(rows, seq, heads, out.shape[-1])


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
    # under autocast the rotary embedding hands over fp32 queries and keys (fp32 cos/sin from the fp32 residual
    # stream) beside a bf16 value: cast as autocast casts SDPA's inputs (the fallback's result is the same), or no
    # layer would reach the 16-bit kernel
    device = query.device.type
    if torch.is_autocast_enabled(device):
        query, key, value = (t.to(torch.get_autocast_dtype(device)) for t in (query, key, value))
    if not (dropout and module.training):
        out = _flash(query, key, value, cu_seq_lens_q, max_length_q or seq, scaling)
        if out is not None:
            return out, None
    mask = document_mask(cu_seq_lens_q, rows, seq)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(model: PreTrainedModel) -> None:
    """Route the model's attention through `varlen_attention` (registered once with transformers)."""
    from transformers import AttentionInterface

    global _KERNEL
    _KERNEL = _varlen()  # looked up once, not inside a compiled block
    AttentionInterface.register(NAME, varlen_attention)
    model.set_attn_implementation(NAME)
