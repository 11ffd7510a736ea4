"""Eval loss over the whole held-out set: every rank scores its share, no gradient, any strategy.

The set is cut into global micro-batches (micro_batch rows per data-parallel rank), the last one filled up with
rows that score nothing, so every rank runs the same number of forwards (FSDP and ZeRO-3 gather weights inside
them: a rank that stopped early would hang the others). Token losses and labelled-token counts are summed over
all of it, then over the ranks: the loss is per trained token, whatever the split.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsrun.errors import DataError
from dsrun.loss import IGNORE_INDEX
from dsrun.model_inputs import HostEmbedding, model_inputs
from dsrun.packing import Blocks


class Evaluator:
    SIZE = "packs into {} rows"  # how the set's size reads in the too-small error

    def __init__(self, blocks: Blocks, micro_batch: int, rank: int, data_parallel: int, replicas: int = 1):
        per_step = micro_batch * data_parallel
        if len(blocks) < per_step:
            raise DataError(f"the eval set {self.SIZE.format(len(blocks))}, fewer than one batch ({micro_batch} x "
                            f"{data_parallel} processes); raise data.eval_split, add eval data or lower "
                            "train.micro_batch")
        self.blocks, self.micro_batch, self.rank, self.per_step = blocks, micro_batch, rank, per_step
        self.replicas = replicas  # ranks of one tensor-parallel group score the same rows: counted once
        self.steps = math.ceil(len(blocks) / per_step)

    def _rows(self, step: int) -> tuple[tuple[Any, ...], torch.Tensor]:
        """This rank's rows of global micro-batch `step` (Blocks.rows) and which of them are real: past the end
        of the set, a real row stands in as filler."""
        start = step * self.per_step + self.rank * self.micro_batch
        index = torch.arange(start, start + self.micro_batch)
        return self.blocks.rows(index.clamp(max=len(self.blocks) - 1)), index < len(self.blocks)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        (inputs, labels, positions), real = self._rows(step)
        labels = labels.masked_fill(~real[:, None], IGNORE_INDEX)  # filler rows: a real row's tokens, no score
        return inputs, labels, positions

    def __call__(self, model: Any, fabric: Any, embedding: HostEmbedding | None = None) -> dict[str, float]:
        totals = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # loss sum, labelled tokens
        model.eval()
        with torch.no_grad():
            for step in range(self.steps):
                token_losses, labelled = model(**model_inputs(*self._batch(step), fabric.device, embedding))
                totals[0] += token_losses.double()
                totals[1] += labelled
        model.train()
        if fabric.world_size > 1:
            totals = fabric.all_reduce(totals, reduce_op="sum")
        loss_sum, count = (totals / self.replicas).tolist()  # the one host sync of an eval pass
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
