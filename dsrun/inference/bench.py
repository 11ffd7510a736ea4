"""task=bench_infer: time to first token, decode tokens/s and peak memory per batch size and quant option, for dsrun's
engine (dsrun/inference/engine.py — what `dsrun generate` and `dsrun serve` run) beside transformers' `generate`:
plain (what ../shared/anchors/infer_hf.py measures) and, on CUDA, with its static cache and compiled decode step
(`hf_static`). Then aggregate tokens/s of `bench_infer.concurrent` requests sent to the engine at once.
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
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch._dynamo

from dsrun.inference.engine import Engine, Request, compile_wanted, pow2_at_least
from dsrun.inference.load import load
from dsrun.inference.metrics import ServerMetrics
from dsrun.run.files import run_dir

if TYPE_CHECKING:
    from dsrun.schema import BenchInferConfig
    from dsrun.schema import RunConfig


def bench_task(cfg: RunConfig) -> list[dict[str, Any]]:
    bench = cfg.bench_infer
    rows: list[dict[str, Any]] = []
    for quant in bench.quants or [cfg.quant.method]:
        job = copy.deepcopy(cfg)
        if quant != cfg.quant.method:
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


def bench_model(loaded: Any, bench: BenchInferConfig, quant: str) -> list[dict[str, Any]]:
    model, device = loaded.model, loaded.device
    vocab = model.config.get_text_config().vocab_size
    # the engine first: its rows are the ones a user's command runs, and they come out before the slow anchors
    rows = []
    engine = bench_engine(loaded, bench)
    for batch in bench.batches:
        submit(engine, prompts(vocab, batch, bench.prompt_tokens), bench.new_tokens)  # warm-up: allocator, graphs
        reset_peak(device)
        requests, started, wall = submit(engine, prompts(vocab, batch, bench.prompt_tokens), bench.new_tokens)
        first = max(map(first_token, requests))
        finished = started + wall
        rows.append(row("dsrun_engine", quant, batch, bench, first - started,
                        batch * (bench.new_tokens - 1) / max(finished - first, 1e-9), device))
    rows.append(concurrent_row(engine, loaded, bench, quant, vocab))
    engine.stop(10)
    del engine  # its cache and graphs, before the anchors allocate theirs
    gc.collect()
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    # the anchors, each: x, new tokens -> generated ids
    paths: dict[str, Callable[[torch.Tensor, int], Any]] = {
        "hf_generate": lambda x, new: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                                     min_new_tokens=new, **kwargs)}
    if device.type == "cuda" and bench.static_anchor:
        length = max(1024, pow2_at_least(bench.prompt_tokens + bench.new_tokens))
        static = static_settings(length)
        warm_up_static(model, list(bench.batches), static)
        paths["hf_static"] = lambda x, new: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                                           min_new_tokens=new, **kwargs, **static)
    for name, run in paths.items():
        for batch in bench.batches:
            x = prompts(vocab, batch, bench.prompt_tokens).to(device)
            with torch.inference_mode():
                run(x, 4)  # warm-up (allocator, kernels; the compiled paths are compiled already)
                reset_peak(device)
                ttft = timed(lambda: run(x, 1), device)
                total = timed(lambda: run(x, bench.new_tokens), device)
            rows.append(row(name, quant, batch, bench, ttft, batch * (bench.new_tokens - 1) / max(total - ttft, 1e-9),
                            device))
    return rows


def row(case: str, quant: str, batch: int, bench: BenchInferConfig, ttft_s: float, decode_tok_s: float,
        device: torch.device) -> dict[str, Any]:
    result = {"case": case, "quant": quant, "batch": batch, "prompt": bench.prompt_tokens,
              "new_tokens": bench.new_tokens, "ttft_ms": round(ttft_s * 1e3, 1), "decode_tok_s": round(decode_tok_s, 1),
              "peak_gib": round(peak_gib(device), 2)}
    print(f"dsrun: {json.dumps(result)}", file=sys.stderr)
    return result


def prompts(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))


def bench_engine(loaded: Any, bench: BenchInferConfig) -> Engine:
    """The engine `dsrun serve` runs, sized for the largest batch, its decode step warmed up for every slot count
    and cache length the rows will use (greedy, as the anchors)."""
    slots = max(*bench.batches, bench.concurrent)
    engine = Engine(loaded.model, slots=slots, max_len=bench.prompt_tokens + bench.new_tokens,
                    metrics=ServerMetrics(), max_queue=slots, seed=0, compile=compile_wanted(bench.compile, loaded.device))
    engine.warm_up(*engine.buckets(shortest=bench.prompt_tokens + 1), setting="bench_infer.compile")
    return engine


def submit(engine: Engine, ids: torch.Tensor, new_tokens: int) -> tuple[list[Request], float, float]:
    """Every row of ids as a greedy request at once; returns the requests, when they were sent and the wall time
    until the last one finished."""
    requests = [Request(ids=r, max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, stop=[]) for r in ids.tolist()]
    synchronize(engine.device)
    started = time.perf_counter()
    for request in requests:
        request.arrived = started
        engine.submit(request)
    for request in requests:
        while (event := request.events.get())[0] != "done":
            if event[0] == "error":
                raise RuntimeError(f"the engine failed: {event[1]}")
    return requests, started, time.perf_counter() - started


def first_token(request: Request) -> float:
    """When a finished request's first token came (every request here asks for at least one)."""
    assert request.first_token_at is not None, "a finished request without a first token"
    return request.first_token_at


def concurrent_row(engine: Engine, loaded: Any, bench: BenchInferConfig, quant: str, vocab: int) -> dict[str, Any]:
    """`concurrent` requests submitted at once: aggregate tokens/s over the wall time, mean TTFT, the largest
    number of slots decoded together."""
    reset_peak(loaded.device)
    seen = len(engine.batch_sizes)
    requests, _, wall = submit(engine, prompts(vocab, bench.concurrent, bench.prompt_tokens), bench.new_tokens)
    result = row("dsrun_engine_concurrent", quant, bench.concurrent, bench,
                 sum(first_token(r) - r.arrived for r in requests) / len(requests),
                 sum(r.generated for r in requests) / wall, loaded.device)
    return {**result, "max_batch_seen": max(engine.batch_sizes[seen:], default=0)}


def static_settings(max_cache_len: int) -> dict[str, Any]:
    """The hf_static anchor: generate() keyword arguments that select transformers' static cache and its compiled
    decode step (one static graph per batch size)."""
    from transformers import CompileConfig

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return {"cache_implementation": "static", "max_cache_len": max_cache_len,
            "compile_config": CompileConfig(fullgraph=False, dynamic=False)}


def warm_up_static(model: Any, batch_sizes: list[int], extra: dict[str, Any]) -> None:
    """Compile (and capture) every decode shape the hf_static rows will run, so none is compiled while timed."""
    vocab = model.config.get_text_config().vocab_size
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, 16), device=model.device)
        with torch.inference_mode():
            for _ in range(2):  # CUDA graphs are recorded on the second run of a shape
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0, eos_token_id=None, **extra)


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
