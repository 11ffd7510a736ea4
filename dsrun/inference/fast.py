"""Fast decode on GPU: transformers' static KV cache with the decode step compiled (CUDA graphs through
torch.compile's reduce-overhead mode), shapes fixed before anything is timed or served.

What recompiles is the decode step's shapes: the batch size and the cache length (the prefill runs eagerly, so the
prompt length does not matter). The cache length is one bucket (a power of two >= the longest prompt + new
tokens, at least 1024), fixed at warm-up; each batch size used is warmed up once. Checked on CPU with the
`eager` backend (tests/test_inference.py counts compiled graphs)."""

from __future__ import annotations

import sys
from typing import Any

import torch

MIN_BUCKET = 1024


def cache_bucket(tokens: int) -> int:
    """The static cache length for sequences of up to `tokens` tokens: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(tokens - 1, 1).bit_length())


def wanted(setting: Any, device: torch.device) -> bool:
    """generate.static_cache: auto is on for CUDA (on CPU the compiled step gains little and compiles slowly)."""
    value = str(setting).lower()
    return device.type == "cuda" if value == "auto" else value == "true"


def static_settings(max_cache_len: int, backend: str = "inductor") -> dict[str, Any]:
    """generate() keyword arguments that select the static cache and the compiled decode step."""
    from transformers import CompileConfig

    import torch._dynamo

    # one graph per batch size: the default limit (8) would silently fall back to eager past 8 sizes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # dynamic=False: a static graph per batch size (torch's automatic dynamic shapes would make the batch symbolic
    # at the second size, and every size would share that slower graph)
    compile_config = CompileConfig(backend=backend, fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told (CPU tests)
    return {"cache_implementation": "static", "max_cache_len": max_cache_len, "compile_config": compile_config}


def warm_up(model: Any, batch_sizes: list[int], max_cache_len: int, extra: dict[str, Any]) -> None:
    """One short generate per batch size at the fixed cache length: compiles (and captures) every decode shape
    that will run, so nothing recompiles while timed or serving. Under inference_mode, as every later call must be:
    a call in grad mode guards differently and compiles again (seen on CPU)."""
    vocab = model.config.get_text_config().vocab_size
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, 16), device=model.device)
        with torch.inference_mode():
            for _ in range(2):  # CUDA graphs are recorded on the second run of a shape
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
    print(f"dsrun: warmed up the compiled decode step for batch sizes {batch_sizes}, cache {max_cache_len} tokens",
          file=sys.stderr)
