"""The next token of every row on the device, each row with its own temperature, top-p, top-k and seed.

A row draws its token by inverse transform: one number in (0, 1) from a counter-based hash of (the row's seed, the
token's position) picks the first token whose cumulative probability reaches it. A request's tokens depend on its
own seed only — not on which other requests share the batch or in which slot it runs — and nothing is drawn from a
global generator, so the step stays one graph. One number per row, where Gumbel noise needs one per vocabulary
entry (a 129k vocabulary's hash was most of a small model's sampled decode step on a CPU)."""

from __future__ import annotations

import torch

_MASK31 = 0x7FFFFFFF


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """[rows, vocab] float logits -> [rows] token ids. Rows with temperature 0 take the top token (argmax: the
    first of equal ones, as transformers' greedy search). `truncate=False` says no row cuts by top-p or top-k: the
    vocabulary's sort is skipped (on a CPU it costs most of a small model's decode step). The cumulative sum runs in
    vocabulary order both ways, so both draw the same token where the cut keeps every token."""
    vocab = logits.shape[-1]
    probs = (logits.float() / temperature.clamp_min(1e-5)[:, None]).softmax(-1)
    if truncate:
        ordered, order = probs.sort(-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        # top-p keeps the smallest prefix whose mass reaches p (the first token always); top-k the first k
        kept = (ordered.cumsum(-1) - ordered < top_p[:, None]) & (
            rank[None] < torch.where(top_k > 0, top_k, vocab)[:, None])
        probs = probs.masked_fill(~torch.empty_like(kept).scatter_(-1, order, kept), 0.0)
    cdf = probs.cumsum(-1)
    target = uniform(seeds, positions) * cdf[:, -1]  # the kept mass: no renormalising pass
    drawn = (cdf < target[:, None]).sum(-1).clamp_max(vocab - 1)
    return torch.where(temperature > 0, drawn, logits.argmax(-1))


def uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[rows] numbers in (0, 1) from (seed, position): a few multiply-xorshift rounds on 31-bit integers (products
    stay below 2**62, so int64 never overflows on any device); 24 bits, exact in float32, never 0 or 1."""
    x = ((seeds & _MASK31) * 1_000_003 + (positions & _MASK31) * 7_919) & _MASK31
    for _ in range(3):
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
        x = ((x ^ (x >> 13)) * 0x297A2D39) & _MASK31
    return ((x >> 7).float() + 0.5) / 2**24
