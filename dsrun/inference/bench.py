"""task=bench_infer: time to first token, decode tokens/s and peak memory per batch size and quant option, for
plain transformers `generate` (what ../shared/anchors/infer_hf.py measures) and dsrun's two fast paths on CUDA
(`dsrun_static`: `generate` with a static cache and the compiled decode step; `dsrun_loop`: dsrun's own greedy
loop over the same, no host sync per token, dsrun/inference/decode.py), then aggregate tokens/s of
`bench_infer.concurrent` requests through the serving engine.
Prompts are random token ids (random-init models have no language). A table on stdout, rows as JSON in the run
folder (and bench_infer.json_path)."""

from __future__ import annotations

import copy
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dsrun.inference.decode import GreedyDecoder
from dsrun.inference.engine import Request, build_engine
from dsrun.inference.fast import cache_bucket, static_settings, wanted, warm_up
from dsrun.inference.load import load
from dsrun.inference.metrics import ServerMetrics
from dsrun.runs import run_dir


def bench_task(cfg: Any) -> list[dict[str, Any]]:
    bench = cfg.bench_infer
    rows: list[dict[str, Any]] = []
    for quant in bench.quants:
        job = copy.deepcopy(cfg)
        job.quant.method = job.quant.name = quant
        loaded = load(job)
        rows += bench_model(loaded, bench, quant)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_table(rows)
    for path in [run_dir() / "bench_infer.json", *([Path(bench.json_path)] if bench.json_path else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"dsrun: rows written to {run_dir() / 'bench_infer.json'}", file=sys.stderr)
    return rows


def bench_model(loaded: Any, bench: Any, quant: str) -> list[dict[str, Any]]:
    model, device = loaded.model, loaded.device
    vocab = model.config.get_text_config().vocab_size
    length = cache_bucket(bench.prompt_tokens + bench.new_tokens)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    # each path: x, new tokens -> generated ids
    paths: dict[str, Callable[[torch.Tensor, int], Any]] = {
        "hf_generate": lambda x, new: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                                     min_new_tokens=new, **kwargs)}
    if wanted("auto", device):
        static = static_settings(length)
        warm_up(model, list(bench.batches), length, static)
        paths["dsrun_static"] = lambda x, new: model.generate(x, attention_mask=torch.ones_like(x),
                                                              max_new_tokens=new, min_new_tokens=new, **kwargs,
                                                              **static)
        decoder = GreedyDecoder(model, length)
        try:  # a path that fails to compile (a quantizer's layers, say) is reported; the others are still measured
            with torch.inference_mode():
                decoder.warm_up(list(bench.batches))
            paths["dsrun_loop"] = decoder
        except Exception as exc:  # noqa: BLE001 - the benchmark's other paths must not be lost with it
            print(f"dsrun: warning: dsrun_loop left out for quant={quant}: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}", file=sys.stderr)
    rows = []
    for name, run in paths.items():
        for batch in bench.batches:
            generator = torch.Generator().manual_seed(batch)
            x = torch.randint(0, vocab, (batch, bench.prompt_tokens), generator=generator).to(device)
            with torch.inference_mode():
                run(x, 4)  # warm-up (allocator, kernels; the compiled paths are compiled already)
                reset_peak(device)
                ttft = timed(lambda: run(x, 1), device)
                total = timed(lambda: run(x, bench.new_tokens), device)
            rows.append({"case": name, "quant": quant, "batch": batch, "prompt": bench.prompt_tokens,
                         "new_tokens": bench.new_tokens, "ttft_ms": round(ttft * 1e3, 1),
                         "decode_tok_s": round(batch * (bench.new_tokens - 1) / max(total - ttft, 1e-9), 1),
                         "peak_gib": round(peak_gib(device), 2)})
            print(f"dsrun: {json.dumps(rows[-1])}", file=sys.stderr)
    rows.append(concurrent_row(loaded, bench, quant, vocab))
    return rows


def concurrent_row(loaded: Any, bench: Any, quant: str, vocab: int) -> dict[str, Any]:
    """`concurrent` requests submitted at once to the serving engine: aggregate tokens/s, mean TTFT, the largest
    batch the engine decoded."""
    from omegaconf import OmegaConf

    serve_cfg = OmegaConf.create({"max_queue": bench.concurrent, "max_batch": bench.concurrent, "seed": 0,
                                  "max_tokens": bench.new_tokens, "kv_cache_tokens":
                                  bench.concurrent * (bench.prompt_tokens + bench.new_tokens) + 1024})
    reset_peak(loaded.device)
    engine = build_engine(loaded.model, serve_cfg, ServerMetrics())
    generator = torch.Generator().manual_seed(0)
    requests = [Request(ids=torch.randint(0, vocab, (bench.prompt_tokens,), generator=generator).tolist(),
                        max_new_tokens=bench.new_tokens, temperature=0.0, top_p=1.0, stop=[])
                for _ in range(bench.concurrent)]
    started = time.perf_counter()
    for request in requests:
        engine.submit(request)
    for request in requests:
        while request.events.get()[0] != "done":
            pass
    wall = time.perf_counter() - started
    engine.stop(10)
    tokens = sum(r.generated for r in requests)
    return {"case": f"dsrun_engine_{type(engine).__name__}", "quant": quant, "batch": bench.concurrent,
            "prompt": bench.prompt_tokens, "new_tokens": bench.new_tokens,
            "ttft_ms": round(1e3 * sum(r.first_token_at - r.arrived for r in requests) / len(requests), 1),
            "decode_tok_s": round(tokens / wall, 1), "peak_gib": round(peak_gib(loaded.device), 2),
            "max_batch_seen": max(engine.batch_sizes, default=0)}


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """GPU: peak allocated since the last reset (what the anchor reports). CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dsrun inference benchmark (aggregate tokens/s for the engine rows)")
    for column in ("case", "quant", "batch", "prompt", "new_tokens", "ttft_ms", "decode_tok_s", "peak_gib"):
        table.add_column(column, justify="left" if column in ("case", "quant") else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("case", "quant", "batch", "prompt", "new_tokens", "ttft_ms",
                                               "decode_tok_s", "peak_gib")))
    Console(width=120).print(table)
