"""Documents into fixed-length rows: inputs, labels (-100 where no loss), and per-document position ids.

Every row is `seq_len` (input, label) pairs, so every step has one shape (no recompiles, one plan). Packed rows
hold several documents, placed best-fit by length (a document is split only when it is longer than a row); with
`document_mask` their position ids restart at 0 at each document, which is how transformers tells documents
apart: with no attention mask it builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`; SDPA/eager get an explicit mask, flash-attention varlen
lengths), so no document attends to another. Unpacked rows hold one document (or one piece of a long one),
padded with masked labels.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch

from dsrun.chat import Document
from dsrun.loss import IGNORE_INDEX


@dataclass
class Blocks:
    """Rows of `seq_len` pairs. `positions` is None where the default 0..seq_len-1 is right (one sequence per
    row: unpacked rows, packing without document masks, synthetic tokens)."""

    inputs: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64, IGNORE_INDEX where no loss
    positions: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # counts, and the first skipped record's name
    reference: torch.Tensor | None = None  # task=dpo without adapters: [pairs, 2] reference log-probabilities

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def rows(self, index: torch.Tensor) -> tuple[Any, ...]:
        """(inputs, labels, positions) of the rows at `index`, and their reference log-probabilities if any."""
        positions = self.positions[index] if self.positions is not None else None
        reference = (self.reference[index],) if self.reference is not None else ()
        return self.inputs[index], self.labels[index], positions, *reference


def pieces(doc: Document, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) pairs of a document, cut into pieces of at most seq_len; no target is lost at a cut."""
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(doc.ids[1:], doc.trained[1:])]
    inputs = doc.ids[:-1]
    return [(inputs[s:s + seq_len], labels[s:s + seq_len]) for s in range(0, len(inputs), seq_len)]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, longest items first, each into the fullest bin it fits (ties: the newest bin).
    Free space is bucketed by size, so a search is a bisect over at most `capacity` distinct sizes."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free slots -> bins with exactly that much room
    sizes: list[int] = []  # sorted keys of by_free
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(sizes, n)
        if at < len(sizes):
            free = sizes[at]
            chosen = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                sizes.pop(at)
        else:
            free, chosen = capacity, len(bins)
            bins.append([])
        bins[chosen].append(i)
        left = free - n
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(sizes, left)
            by_free[left].append(chosen)
    return bins


def pack(docs: list[Document], seq_len: int, pad_id: int, packing: bool = True,
         document_mask: bool = True) -> Blocks:
    """Rows of seq_len pairs; `stats` counts documents, split documents, rows and padding for the summary line."""
    parts: list[tuple[list[int], list[int]]] = []
    split = 0
    for doc in docs:
        cut = pieces(doc, seq_len)
        split += len(cut) > 1
        parts.extend(p for p in cut if p[0])
    rows = best_fit([len(p[0]) for p in parts], seq_len) if packing else [[i] for i in range(len(parts))]
    # flat lists, one tensor each at the end: fast for 100k documents
    flat: tuple[list[int], list[int], list[int]] = ([], [], [])
    inputs, labels, positions = flat
    for members in rows:
        at = 0
        for i in members:
            ids, targets = parts[i]
            inputs += ids
            labels += targets
            positions += range(len(ids))
            at += len(ids)
        inputs += [pad_id] * (seq_len - at)
        labels += [IGNORE_INDEX] * (seq_len - at)
        positions += range(seq_len - at)  # the padding is a document of its own
    tensors = [torch.tensor(x, dtype=torch.long).view(len(rows), seq_len) for x in flat]
    stats = {"documents": len(docs), "split": split, "rows": len(rows),
             "padding": sum(seq_len - sum(len(parts[i][0]) for i in m) for m in rows)}
    return Blocks(tensors[0], tensors[1], tensors[2] if packing and document_mask else None, stats)
