"""Where the engine's batch-1 decode time goes, on one GPU (a diagnosis, not a benchmark row): the
R1-Distill-Qwen-7B shape with fewer layers (compiles in seconds), bf16, random init. Times, in one process:
  engine   - `dsrun generate`'s path: a (kv_len - 256)-token prompt, 256 greedy tokens through the Engine (compiled, graphed)
  dyn2     - the engine's compiled step alone (dynamic shapes, 2 rows: MIN_ROWS) + argmax, replayed back to back
  static1  - the same step compiled for exactly 1 row (static shapes) + argmax
  static1_cd - static1 with inductor's coordinate-descent tuning
  eager1   - the step uncompiled, 1 row
and prints ms per step and the weight bytes read per second. Run: python bench/engine_probe.py --layers 8"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch._dynamo
from omegaconf import OmegaConf

from dsrun.inference.engine import Engine, Request
from dsrun.inference.metrics import ServerMetrics
from dsrun.model import architecture, build_model

ROOT = Path(__file__).resolve().parent.parent


def build(layers: int) -> torch.nn.Module:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "r1_distill_qwen_7b.yaml")
    cfg.fields.num_hidden_layers = layers
    cfg.experts_implementation = None
    arch = architecture(cfg)
    arch.use_cache = True
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return build_model(cfg, arch, seed=0, dtype=torch.bfloat16).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_step(fn, steps: int = 200) -> float:
    for _ in range(5):
        torch.compiler.cudagraph_mark_step_begin()
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def time_engine(model: torch.nn.Module, kv_len: int) -> float:
    engine = Engine(model, slots=2, max_len=kv_len, metrics=ServerMetrics(), max_queue=4, seed=0, compile=True)
    engine.warm_up(*engine.buckets(shortest=kv_len - 255), setting="probe")
    for _ in range(2):
        request = Request(ids=list(range(1, kv_len - 255)), max_new_tokens=256, temperature=0.0, top_p=1.0, stop=[])
        request.arrived = time.perf_counter()
        engine.submit(request)
        while request.events.get()[0] != "done":
            pass
        took = (time.perf_counter() - request.first_token_at) / 255
    engine.stop(10)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-len", type=int, default=768)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="comma-separated rows to time (default: all)")
    args = parser.parse_args()
    model = build(args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    rows: dict[str, float] = {}

    if not args.only or "engine" in args.only.split(","):
        rows["engine"] = time_engine(model, args.kv_len)

    plain = Engine(model, slots=2, max_len=args.kv_len, metrics=ServerMetrics(), max_queue=4, seed=0, compile=False)
    plain.positions.fill_(args.kv_len - 100)
    with torch.inference_mode():
        variants = {"dyn2": (2, {"dynamic": True, "mode": "reduce-overhead"}, {}),
                    "static1": (1, {"dynamic": False, "mode": "reduce-overhead"}, {}),
                    "static1_cd": (1, {"dynamic": False, "mode": "reduce-overhead"},
                                   {"coordinate_descent_tuning": True}),
                    "eager1": (1, None, {}),
                    "dyn2_cd": (2, {"dynamic": True, "mode": "reduce-overhead"}, {"coordinate_descent_tuning": True}),
                    "static1_ma": (1, {"dynamic": False, "mode": "max-autotune"}, {"coordinate_descent_tuning": True})}
        wanted = set(args.only.split(",")) if args.only else None
        variants = {k: v for k, v in variants.items() if wanted is None or k in wanted}
        # CUDA graph trees live in the thread-local state of the thread that first compiled (the engine's): the
        # variants here, on the main thread, record plain CUDA graphs instead (the same replay cost)
        torch._inductor.config.triton.cudagraph_trees = False
        for name, (r, compile_kw, inductor) in variants.items():
            torch._dynamo.reset()
            for key, value in inductor.items():
                setattr(torch._inductor.config, key, value)
            step = plain._decode if compile_kw is None else torch.compile(plain._decode, **compile_kw)
            tokens, positions = plain.tokens[:r], plain.positions[:r]
            started = time.perf_counter()
            per_step(lambda: step(tokens, positions, args.kv_len).argmax(-1), steps=3)
            compile_s = time.perf_counter() - started
            rows[name] = per_step(lambda: step(tokens, positions, args.kv_len).argmax(-1))
            print(f"{name}: compiled in {compile_s:.0f} s", flush=True)
            for key in inductor:
                setattr(torch._inductor.config, key, False)
    plain.stop(10)
    report = {name: {"ms_per_step": round(t * 1e3, 3), "tok_s": round(1 / t, 1),
                     "weights_GB_s": round(weight_bytes / t / 1e9, 0)} for name, t in rows.items()}
    report["setup"] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "layers": args.layers,
                       "weight_GB": round(weight_bytes / 1e9, 3), "kv_len": args.kv_len}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
