"""Greedy decode without `generate`: a compiled step per batch size over a static KV cache (CUDA graphs through
torch.compile's reduce-overhead mode on CUDA), the next token chosen on the device, no host sync per token.

transformers' `generate` checks its stopping criteria on the host after every token, so the host's per-token work
and the GPU's never overlap: on the 1.5B shape the same static cache and compiled step decoded 249 tokens/s
through `generate` and 392 in a loop like this one (BENCHMARKS.md, `bench/decode.py`). `task=bench_infer` measures
it as the `dsrun_loop` case beside `generate`'s static path."""

from __future__ import annotations

from typing import Any

import torch


class GreedyDecoder:
    """`decoder(ids, new_tokens)` -> ids followed by `new_tokens` greedy tokens, for unpadded prompts of one
    length per call. One static cache (and one compiled graph) per batch size, reused across calls."""

    def __init__(self, model: Any, max_cache_len: int, backend: str = "inductor"):
        self.model, self.max_cache_len = model, max_cache_len
        self.caches: dict[int, Any] = {}
        options = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
        # dynamic=False: a static graph per batch size (the cache object differs, so each recompiles anyway);
        # fullgraph=False as transformers' own compiled decode: bitsandbytes' 8-bit layers break the graph
        self.step = torch.compile(self._step, fullgraph=False, dynamic=False, **options)

    def _step(self, token: torch.Tensor, position: torch.Tensor, cache: Any) -> torch.Tensor:
        logits = self.model(token, cache=cache, cache_position=position, position_ids=position[None],
                            use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        from transformers import StaticCache

        batch, prompt = ids.shape
        if prompt + new_tokens > self.max_cache_len:
            raise ValueError(f"{prompt} prompt + {new_tokens} new tokens exceed the cache of {self.max_cache_len}")
        cache = self.caches.get(batch)
        if cache is None:
            cache = self.caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        else:
            cache.reset()  # in place: the captured graph keeps reading the same memory
        # the prefill runs eagerly (every prompt length would be a graph); it also allocates the cache's tensors
        logits = self.model(ids, cache=cache, cache_position=torch.arange(prompt, device=ids.device),
                            use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens, position = [token], torch.tensor([prompt], device=ids.device)
        for i in range(new_tokens - 1):
            torch.compiler.cudagraph_mark_step_begin()
            token = self.step(token, position + i, cache).clone()  # a graph's output is overwritten by its next replay
            tokens.append(token)
        return torch.cat([ids, *tokens], dim=1)

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Compile (and on CUDA record) the step of every batch size that will run."""
        vocab = self.model.config.get_text_config().vocab_size
        for batch in batch_sizes:
            ids = torch.randint(0, vocab, (batch, 16), device=self.model.device)
            for _ in range(2):
                self(ids, 4)
