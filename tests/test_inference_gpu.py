"""Inference on a GPU (run through the device tool: `python -m pytest -m gpu tests/test_inference_gpu.py`); skipped
on CPU. The 7B numbers come from `task=bench_infer` (docs/deploy.md), not from here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import dsrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                 reason="needs a CUDA GPU: run through the device tool")]

# R1-Distill-Qwen-1.5B's width with 2 of its layers: real kernel shapes, seconds to build
SHAPE = ["model=r1_distill_qwen_1_5b", "model.fields.num_hidden_layers=2", "hardware=auto", "hardware.devices=1"]


def small_model() -> torch.nn.Module:
    """R1-Distill-Qwen-1.5B's width, 2 layers, fp32 on the GPU, eval mode, KV cache on."""
    from omegaconf import OmegaConf

    from dsrun.model import architecture, build_model

    model_cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "model" / "r1_distill_qwen_1_5b.yaml")
    model_cfg.fields.num_hidden_layers = 2
    model_cfg.experts_implementation = None
    arch = architecture(model_cfg)
    arch.use_cache = True
    with torch.device("cuda"):
        return build_model(model_cfg, arch, seed=0, dtype=torch.float32).eval()


def test_engine_with_cuda_graphs_matches_plain_greedy_and_never_recompiles():
    """The engine's compiled, CUDA-graphed decode step (fp32: the first 8 greedy tokens of each request agree with
    plain `generate` for that prompt alone) while requests of different lengths share the slots; no graph is
    compiled after the warm-up."""
    from torch._dynamo.utils import counters

    from dsrun.inference.engine import Engine, Request
    from dsrun.inference.metrics import ServerMetrics

    model = small_model()
    engine = Engine(model, slots=4, max_len=1024, metrics=ServerMetrics(), max_queue=8, seed=0, compile=True)
    engine.warm_up([2, 4], [256, 512])
    graphs = counters["stats"]["unique_graphs"]
    prompts = [torch.randint(0, 150000, (n,)).tolist() for n in (17, 300, 64, 5, 130)]
    requests = [Request(ids=ids, max_new_tokens=16, temperature=0.0, top_p=1.0, stop=[]) for ids in prompts]
    for request in requests:
        engine.submit(request)
    for ids, request in zip(prompts, requests):
        tokens = []
        while (event := request.events.get(timeout=300))[0] != "done":
            assert event[0] == "tokens", event
            tokens += event[1]
        x = torch.tensor([ids], device="cuda")
        with torch.inference_mode():
            plain = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        assert tokens[:8] == plain[0, len(ids):len(ids) + 8].tolist()
    engine.stop(10)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode shape recompiled after warm-up"


def test_bench_infer_engine_beats_plain_generate(tmp_path):
    proc = dsrun("task=bench_infer", *SHAPE, "precision=bf16", "bench_infer.batches=[1,8]",
                 "bench_infer.prompt_tokens=128", "bench_infer.new_tokens=64", "bench_infer.concurrent=16",
                 "bench_infer.static_anchor=false", run_dir=tmp_path / "bench", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "bench_infer.json").read_text())
    by = {(r["case"], r["batch"]): r for r in rows}
    for batch in (1, 8):
        assert by[("dsrun_engine", batch)]["decode_tok_s"] > 2 * by[("hf_generate", batch)]["decode_tok_s"], rows
    assert by[("dsrun_engine_concurrent", 16)]["max_batch_seen"] >= 8, rows


def test_generate_and_nf4_on_the_gpu(tmp_path):
    """A random-init model never closes R1's <think>: with show_thinking=show all of it is on stdout (the default,
    dim, puts the thinking on stderr, and stdout was empty: what this test saw before)."""
    proc = dsrun("generate", *SHAPE, "precision=bf16", "quant=nf4", "hi", "generate.max_new_tokens=8",
                 "generate.show_thinking=show", run_dir=tmp_path / "g", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    assert "compiled the decode step in" in proc.stderr
