"""The next token of every row on the device, each row with its own temperature, top-p, top-k and seed.

The random numbers come from a counter-based hash of (the row's seed, the token's position, the vocabulary index):
a request's tokens depend on its own seed only — not on which other requests share the batch or in which slot it
runs — and nothing is drawn from a global generator, so the step stays one graph."""

from __future__ import annotations

import torch

_MASK31 = 0x7FFFFFFF


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """[rows, vocab] float logits -> [rows] token ids. Rows with temperature 0 take the top token (argmax: the
    first of equal ones, as transformers' greedy search). `truncate=False` says no row cuts by top-p or top-k: the
    vocabulary's sort is skipped (on a CPU it cost most of a small model's decode step); the noise belongs to the
    token ids, so both ways draw the same token where the cut keeps every token."""
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp_min(1e-5)[:, None]
    gumbel = uniform(seeds, positions, vocab).log_().neg_().log_().neg_()
    if truncate:
        ordered, order = scaled.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        rank = torch.arange(vocab, device=logits.device)
        # top-p keeps the smallest prefix whose mass reaches p (the first token always); top-k the first k
        keep = (probs.cumsum(-1) - probs < top_p[:, None]) & (
            rank[None] < torch.where(top_k > 0, top_k, vocab)[:, None])
        choice = ordered.masked_fill(~keep, float("-inf")).add(gumbel.gather(-1, order)).argmax(-1, keepdim=True)
        drawn = order.gather(-1, choice)[:, 0]
    else:
        drawn = scaled.add(gumbel).argmax(-1)
    return torch.where(temperature > 0, drawn, logits.argmax(-1))


def uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] numbers in (0, 1) from (seed, position, index): a few multiply-xorshift rounds on 31-bit
    integers (products stay below 2**62, so int64 never overflows on any device)."""
    x = ((seeds & _MASK31) * 1_000_003 + (positions & _MASK31) * 7_919) & _MASK31
    # in place, one scratch tensor: [rows, vocab] int64 temporaries for every operation made this 2.4x slower on
    # a CPU (a third of a tiny model's GRPO step); same values, and torch.compile takes it whole (fullgraph)
    x = torch.add((x * 65_537)[:, None], torch.arange(vocab, device=seeds.device) * 40_503).bitwise_and_(_MASK31)
    shifted = torch.empty_like(x)
    for _ in range(3):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=shifted)).mul_(0x2C1B3C6D).bitwise_and_(_MASK31)
        x.bitwise_xor_(torch.bitwise_right_shift(x, 13, out=shifted)).mul_(0x297A2D39).bitwise_and_(_MASK31)
    return x.bitwise_right_shift_(7).float().add_(0.5).div_(2**24)  # 24 bits: exact in float32, never 0 or 1
