"""One micro-batch as the model's keyword arguments, prepared on the host and copied to the device without a sync:
the tokens (or, under `parallel.offload_embedding`, their embedding rows gathered from host memory), the labels and
which of them carry one (dsrun/loss.py), and packed documents' position ids and bounds (dsrun/attention.py).

A frozen input embedding is a table the step only reads a few rows of: 152,064 x 3,584 bf16 is 1.0 GiB of an 8 GB
card's 7B QLoRA step, for 14 MiB of rows per 2,048 tokens. Kept in host memory, those rows are gathered there and
travel with the batch (Unsloth keeps it on the GPU; ZeRO-Offload moves whole states, not lookups)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsrun.attention import batch_kwargs
from dsrun.errors import ConfigError
from dsrun.lm import CausalLM
from dsrun.loss import label_rows


class HostEmbedding:
    """The input embedding's weight in host memory; `rows(ids)` is what the embedding layer would return."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def rows(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        pinned = device.type == "cuda"
        out = torch.empty((ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=pinned)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=out)
        return out.view(*ids.shape, -1).to(device, non_blocking=pinned)


class _InHostMemory(nn.Module):
    """What stays in the model where the embedding was: nothing to hold, and a clear error if called."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the input embedding lives in host memory (parallel.offload_embedding): pass "
                           "inputs_embeds from dsrun.model_inputs.model_inputs")


def offload_embedding(model: CausalLM) -> HostEmbedding:
    """Move a frozen, untied input embedding out of `model` (adapters already added) into host memory."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        raise ConfigError(["parallel.offload_embedding=true: this model ties its input embedding to the output head, "
                          "which the GPU needs every step; set parallel.offload_embedding=false"])
    if type(embedding) is not nn.Embedding or embedding.weight.requires_grad:
        raise ConfigError(["parallel.offload_embedding=true needs a frozen input embedding, but "
                          f"{type(embedding).__name__} trains (an adapter on it?); take embed_tokens out of "
                          "adapter.target_modules or set parallel.offload_embedding=false"])
    host = HostEmbedding(embedding.weight.detach().to("cpu"))
    model.set_input_embeddings(_InHostMemory(embedding.num_embeddings, embedding.embedding_dim))
    del embedding
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the table's device copy goes back to the driver, not only to the allocator
    return host


def model_inputs(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None, device: torch.device,
                 embedding: HostEmbedding | None = None) -> dict[str, Any]:
    """Host tensors of one micro-batch -> the model's keyword arguments on `device` (copies queued, no sync)."""
    tokens = {"inputs_embeds": embedding.rows(inputs, device)} if embedding is not None else \
        {"input_ids": inputs.to(device, non_blocking=True)}
    rows = label_rows(labels)
    return {**tokens, "labels": labels.to(device, non_blocking=True), **batch_kwargs(positions, device),
            **({"label_rows": rows.to(device, non_blocking=True)} if rows is not None else {})}
