"""How long the engine's decode step takes to compile, and where (torch._dynamo's compile_times), for the GRPO
recipe's model shape: R1-Distill-Qwen-1.5B's dimensions at random, with the recipe's LoRA (r16, all linear layers)
or without, at a few layers (the time grows with them), for 32 rows (an optimizer step's completions).

    python bench/compile_probe.py [--backend inductor|aot_eager] [--layers 4] [--no-lora] [--symbolic-floats]

`aot_eager` runs dynamo and AOT autograd without inductor's code generation: on a CPU it times the part of the
compile that does not depend on the device (issue #32: the 1.5B's decode step took 245 s to compile on an H100)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--symbolic-floats", action="store_true",
                        help="as the engine compiled before 2026-12-08: Python floats left symbolic (a second trace)")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import compile_times
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsrun.inference.engine import Engine
    from dsrun.inference.metrics import ServerMetrics

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(config).to(device, torch.bfloat16)
    if not args.no_lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear")).get_base_model()
    model.eval()
    started = time.perf_counter()
    engine = Engine(model, slots=32, max_len=1025, metrics=ServerMetrics(), max_queue=32, seed=0, compile=True,
                    backend=args.backend)
    if args.symbolic_floats:  # the step compiled as the engine did before, without its specialize_float patch
        mode = {"mode": "reduce-overhead"} if device == "cuda" and args.backend == "inductor" else {}
        engine.step = torch.compile(engine._decode, dynamic=True, fullgraph=False, backend=args.backend, **mode)
    engine.warm_up([32], [256])
    engine.stop(1)
    floats = ", floats symbolic" if args.symbolic_floats else ""
    print(f"{args.layers} layers, {'no LoRA' if args.no_lora else 'LoRA r16'}{floats}, {args.backend} on {device}: "
          f"{time.perf_counter() - started:.1f} s")
    print("\n".join(compile_times(repr="str").splitlines()[:8]))


if __name__ == "__main__":
    main()
