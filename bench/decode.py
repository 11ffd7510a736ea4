"""GPU probe: where batch-1 decode time goes, one model in one process. Random init of a Qwen2 shape (default
R1-Distill-Qwen-1.5B's), bf16, a 512-token prompt:
- plain `generate` (dynamic cache, eager), 64 new tokens;
- the eager forward alone in a Python loop (dynamic cache, greedy on the GPU): the host's cost per layer call;
- dsrun's static path (`dsrun/inference/fast.py`: static cache, decode step compiled with CUDA graphs, warmed up),
  64 and 256 new tokens;
- dsrun's greedy loop (`dsrun/inference/decode.py`: the same static cache, the step compiled in reduce-overhead
  mode, argmax on the GPU, no host sync per token), 256 new tokens: what `generate`'s own per-token work costs.

    python bench/decode.py [--layers 28 --hidden 1536 --intermediate 8960 --heads 12 --kv-heads 2]
    TORCH_LOGS=recompiles,perf_hints python bench/decode.py     # recompiles and CUDA-graph skips, if any
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, PROMPT, CACHE = 151936, 512, 1024


def rate(tokens: int, fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsrun.inference.decode import GreedyDecoder
    from dsrun.inference.fast import static_settings, warm_up

    parser = argparse.ArgumentParser()
    for name, default in (("layers", 28), ("hidden", 1536), ("intermediate", 8960), ("heads", 12), ("kv-heads", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    x = torch.randint(0, VOCAB, (1, PROMPT), device="cuda")
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, "attention_mask": torch.ones_like(x)}
    rows = {}
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        rows["plain generate"] = rate(63, lambda: model.generate(x, max_new_tokens=64, min_new_tokens=64, **kw))

        out = model(x, use_cache=True)
        state = {"past": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def eager_loop() -> None:
            for _ in range(32):
                out = model(state["token"], cache=state["past"], use_cache=True)
                state["token"] = out.logits[:, -1:].argmax(-1)

        rows["eager forward loop"] = rate(32, eager_loop)

        extra = static_settings(CACHE)
        started = time.perf_counter()
        warm_up(model, [1], CACHE, extra)
        print(f"static path warm-up {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for new in (64, 256):
            model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw, **extra)
            rows[f"dsrun static generate, {new} new"] = rate(
                new - 1, lambda n=new: model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw, **extra))

        decoder = GreedyDecoder(model, CACHE)
        decoder.warm_up([1])
        rows["dsrun greedy loop (compiled step, no per-token sync)"] = rate(255, lambda: decoder(x, 256))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers, hidden {args.hidden}; "
          f"batch 1, prompt {PROMPT}")
    print("| path | tokens/s |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
