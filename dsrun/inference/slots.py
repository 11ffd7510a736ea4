"""A KV cache of fixed slots, one sequence per slot, preallocated once (as gpt-fast and the slot-based engines do),
and the attention that reads it.

Each layer holds `[slots, heads, max_len, dim]` keys and values, allocated on the first write with the shape and
dtype the layer writes: grouped-query heads for Qwen/Llama, and for DeepSeek V2/V3 the MLA latent (transformers
caches the compressed `kv_nope` and `k_rot` as one-head tensors, so the same code holds them). A forward pass
writes every row at its own positions (`target`): decode rows at one position each, prefill rows at a run of
them. What a row may read is the additive mask `row_mask` builds from the positions, passed to the model as a 4-D
mask (transformers then builds none of its own).

Decode reads `[:rows, :, :kv_len]`, a view: no copy of the cache per step. `kv_len` is a bucket above the longest
row, so a step reads what the running sequences hold, not the whole preallocated length."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION = "dsrun_slots"


class SlotCache:
    """Duck-types the one method transformers' attention layers call on a cache: `update`."""

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | int = 0  # slot indices (prefill) or a count of leading slots (decode)
        self.positions = torch.zeros(0, 1, dtype=torch.long)  # [rows, tokens]: where each row's tokens go
        self.kv_len = max_len

    def target(self, rows: torch.Tensor | int, positions: torch.Tensor, kv_len: int) -> None:
        """Where the next forward writes: `rows` (slot indices, or n for slots 0..n-1) at `positions`
        ([rows, tokens]); it reads the first kv_len positions of those rows."""
        self.rows, self.positions, self.kv_len = rows, positions, kv_len

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, **_: Any) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        if layer_idx not in self.layers:
            # one position more than is ever read: a read of kv_len <= max_len is then always a strict slice, and
            # the compiled decode step needs no second graph for the full length
            self.layers[layer_idx] = tuple(  # type: ignore[assignment]
                torch.zeros(self.slots, t.shape[1], self.max_len + 1, t.shape[3], dtype=t.dtype, device=t.device)
                for t in (keys, values))
        cached_keys, cached_values = self.layers[layer_idx]
        rows = torch.arange(self.rows, device=keys.device) if isinstance(self.rows, int) else self.rows
        index = (rows[:, None], slice(None), self.positions)  # -> [rows, tokens, heads, dim]
        cached_keys[index] = keys.transpose(1, 2)
        cached_values[index] = values.transpose(1, 2)
        if isinstance(self.rows, int):
            return cached_keys[:self.rows, :, :self.kv_len], cached_values[:self.rows, :, :self.kv_len]
        return cached_keys[self.rows, :, :self.kv_len], cached_values[self.rows, :, :self.kv_len]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


def row_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, tokens, kv_len] additive mask: a token at position p reads positions 0..p of its own row."""
    visible = torch.arange(kv_len, device=positions.device)[None, None, :] <= positions[:, :, None]
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA, except for one query token per row (decode): there the query heads that share a
    key/value head are folded into that head's query rows, so grouped keys are read once and never repeated —
    transformers' own SDPA repeats them whenever a mask is given under torch.compile (7x the cache reads for a
    7B Qwen)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = query.shape[1] // key.shape[1]
    if query.shape[2] != 1 or groups == 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, key.shape[1], groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None


def use_slot_attention(model: PreTrainedModel) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, slot_attention)
    model.set_attn_implementation(ATTENTION)
