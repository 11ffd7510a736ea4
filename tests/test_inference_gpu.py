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


def test_static_cache_compiled_decode_matches_plain_greedy_and_never_recompiles():
    from torch._dynamo.utils import counters

    from dsrun.inference.fast import cache_bucket, static_settings, warm_up

    model = small_model()
    length = cache_bucket(512 + 32)
    extra = static_settings(length)
    warm_up(model, [1, 4], length, extra)
    graphs = counters["stats"]["unique_graphs"]
    for batch, prompt in ((1, 17), (1, 300), (4, 64)):
        x = torch.randint(0, 150000, (batch, prompt), device="cuda")
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
        with torch.inference_mode():
            fast = model.generate(x, **kwargs, **extra)
            plain = model.generate(x, **kwargs)
        assert (fast[:, :prompt + 8] == plain[:, :prompt + 8]).all(), "the first 8 greedy tokens agree (fp32)"
    assert counters["stats"]["unique_graphs"] == graphs, "a decode shape recompiled after warm-up"


def test_greedy_loop_with_cuda_graphs_matches_plain_greedy_and_never_recompiles():
    """dsrun/inference/decode.py with inductor and CUDA graphs: plain `generate`'s greedy tokens (fp32: the first 8
    agree), and no new graph after the warm-up of each batch size."""
    from torch._dynamo.utils import counters

    from dsrun.inference.decode import GreedyDecoder

    model = small_model()
    decoder = GreedyDecoder(model, 1024)
    with torch.inference_mode():
        decoder.warm_up([1, 4])
        graphs = counters["stats"]["unique_graphs"]
        for batch, prompt in ((1, 17), (1, 300), (4, 64)):
            x = torch.randint(0, 150000, (batch, prompt), device="cuda")
            fast = decoder(x, 16)
            plain = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
            assert (fast[:, :prompt + 8] == plain[:, :prompt + 8]).all(), "the first 8 greedy tokens agree (fp32)"
    assert counters["stats"]["unique_graphs"] == graphs, "a decode shape recompiled after warm-up"


def test_bench_infer_fast_path_beats_plain_generate(tmp_path):
    proc = dsrun("task=bench_infer", *SHAPE, "precision=bf16", "bench_infer.batches=[1,8]",
                 "bench_infer.prompt_tokens=128", "bench_infer.new_tokens=64", "bench_infer.concurrent=16",
                 run_dir=tmp_path / "bench", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "bench_infer.json").read_text())
    by = {(r["case"], r["batch"]): r for r in rows}
    for batch in (1, 8):
        for fast in ("dsrun_static", "dsrun_loop"):
            assert by[(fast, batch)]["decode_tok_s"] > by[("hf_generate", batch)]["decode_tok_s"], rows
    assert rows[-1]["max_batch_seen"] >= 8, rows[-1]


def test_generate_and_nf4_on_the_gpu(tmp_path):
    proc = dsrun("generate", *SHAPE, "precision=bf16", "quant=nf4", "hi", "generate.max_new_tokens=8",
                 run_dir=tmp_path / "g", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
