"""`dsrun generate` and the inference pieces on CPU: runs just trained (full weights and LoRA) load and generate, the
greedy output equals transformers' `generate` on the same weights, MLA models batch in the static engine, and the
static-cache decode step does not recompile after warm-up."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import FAST, dsrun

PROMPT = "What is 12 + 30?"
NEW_TOKENS = 8


def train(run_dir: Path, *extra: str) -> Path:
    proc = dsrun(*FAST, "train.max_steps=2", "train.seq_len=64", "train.micro_batch=2", *extra, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def reference(model, tokenizer) -> str:
    """transformers' own greedy generate on the prompt DeepSeek-R1's chat template renders (what dsrun trains on)."""
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    new = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id]
    return tokenizer.decode(new, skip_special_tokens=False)


def dsrun_generate(source: Path, tmp_path: Path) -> str:
    proc = dsrun("generate", str(source), PROMPT, "hardware=cpu", f"generate.max_new_tokens={NEW_TOKENS}",
                 "generate.show_thinking=show", run_dir=tmp_path / "generate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.removesuffix("\n")


def test_generate_from_a_trained_run_equals_transformers_greedy(tmp_path):
    from transformers import AutoModelForCausalLM

    from dsrun.data import load_tokenizer

    run = train(tmp_path / "run")
    text = dsrun_generate(run, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    from omegaconf import OmegaConf

    tokenizer = load_tokenizer(OmegaConf.load(run / "config.yaml").model)
    assert text and text == reference(model, tokenizer)


def test_generate_from_a_lora_run_rebuilds_the_base_the_run_trained(tmp_path):
    from omegaconf import OmegaConf
    from peft import PeftModel

    from dsrun.data import load_tokenizer
    from dsrun.model import architecture, build_model

    run = train(tmp_path / "run", "model=tiny_qwen2", "adapter=lora", "train.lr=1e-2")
    assert (run / "model" / "adapter_config.json").is_file()
    text = dsrun_generate(run, tmp_path)
    snap = OmegaConf.load(run / "config.yaml")
    base = build_model(snap.model, architecture(snap.model), seed=snap.train.seed)
    model = PeftModel.from_pretrained(base, run / "model").eval()  # unmerged: the adapter as trained
    assert text == reference(model, load_tokenizer(snap.model))


def test_prompts_file_answers_every_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first?\n\nsecond?\n")
    proc = dsrun("generate", "model=tiny_qwen2", "hardware=cpu", f"generate.prompts_file={prompts}",
                 "generate.max_new_tokens=3", "generate.temperature=0.8", run_dir=tmp_path / "g")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2


def test_mla_model_requests_are_batched_by_the_static_engine():
    """DeepSeek's MLA cache does not fit transformers' paged cache: the static engine batches what is waiting."""
    from omegaconf import OmegaConf

    from dsrun.inference.engine import Request, StaticBatching, build_engine
    from dsrun.inference.metrics import ServerMetrics
    from dsrun.model import architecture, build_model

    model_cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "model" / "tiny.yaml")
    model_cfg.experts_implementation = "eager"
    arch = architecture(model_cfg)
    model = build_model(model_cfg, arch, seed=0).eval()
    serve_cfg = OmegaConf.create({"max_queue": 16, "max_batch": 8, "seed": 0})
    engine = build_engine(model, serve_cfg, ServerMetrics())
    assert isinstance(engine, StaticBatching)
    requests = [Request(ids=[0, 5 + i, 7, 9][: 2 + i % 3], max_new_tokens=3 + i % 2, temperature=0.0, top_p=1.0,
                        stop=[1]) for i in range(6)]
    engine.waiting.put(None)  # hold the loop between batches: all six are queued before the next batch starts
    for r in requests:
        engine.submit(r)
    for r in requests:
        events = []
        while not events or events[-1][0] != "done":
            events.append(r.events.get(timeout=60))
        assert sum(len(v) for k, v in events if k == "tokens") == r.max_new_tokens
    engine.stop(10)
    assert max(engine.batch_sizes) >= 2, engine.batch_sizes


def tiny_model() -> torch.nn.Module:
    """tiny_qwen2 in fp32, eval mode, KV cache on."""
    from omegaconf import OmegaConf

    from dsrun.model import architecture, build_model

    model_cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "model" / "tiny_qwen2.yaml")
    model_cfg.experts_implementation = None
    arch = architecture(model_cfg)
    arch.use_cache = True
    return build_model(model_cfg, arch, seed=0).eval()


def test_static_cache_decode_does_not_recompile_after_warm_up():
    """The fixed cache bucket: after warm-up per batch size, new prompt lengths add no graph (eager backend on CPU
    stands in for inductor; it compiles the same frames). Each batch size gets its own static graph: left to
    torch's automatic dynamic shapes, the second size would turn the batch symbolic and later sizes would share
    that graph, compiled for no size in particular (with CUDA graphs, recorded per size anyway)."""
    from torch._dynamo.utils import counters

    from dsrun.inference.fast import cache_bucket, static_settings, warm_up

    model = tiny_model()
    length = cache_bucket(300)
    assert length == 1024 and cache_bucket(1500) == 2048
    extra = static_settings(length, backend="eager")
    before = counters["stats"]["unique_graphs"]
    warm_up(model, [1, 2, 4], length, extra)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 3, "one static decode graph per batch size"
    for batch, prompt in ((1, 7), (1, 33), (2, 50), (4, 9), (1, 120)):
        x = torch.randint(2, 1000, (batch, prompt))
        with torch.inference_mode():  # the mode of the warm-up: grad mode would be another graph
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0,
                           eos_token_id=None, **extra)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode shape recompiled after warm-up"


def test_think_splitter_and_detokenizer():
    from dsrun.inference.chat import ThinkSplitter

    split = ThinkSplitter(thinking=False)
    pieces = split.feed("a<thi") + split.feed("nk>b</think>c") + split.flush()
    assert pieces == [(False, "a"), (True, "b"), (False, "c")]
    assert ThinkSplitter(thinking=True).feed("x</think>y") == [(True, "x"), (False, "y")]


def test_bench_infer_runs_on_cpu_and_prints_its_table(tmp_path):
    import json

    proc = dsrun("task=bench_infer", "model=tiny_qwen2", "hardware=cpu", "bench_infer.batches=[1,2]",
                 "bench_infer.prompt_tokens=16", "bench_infer.new_tokens=4", "bench_infer.concurrent=4",
                 run_dir=tmp_path / "bench")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode_tok_s" in proc.stdout and "hf_generate" in proc.stdout
    rows = json.loads((tmp_path / "bench" / "bench_infer.json").read_text())
    assert [r["batch"] for r in rows] == [1, 2, 4]
    assert rows[-1]["max_batch_seen"] >= 2, "the engine batched the concurrent requests"


def test_greedy_decoder_matches_generate_and_compiles_once_per_batch_size():
    """dsrun/inference/decode.py's loop (static cache, compiled step; `eager` backend on CPU, inductor with CUDA
    graphs on a GPU) gives transformers' greedy tokens, and a second call of a batch size adds no graph."""
    from torch._dynamo.utils import counters

    from dsrun.inference.decode import GreedyDecoder

    model = tiny_model()
    decoder = GreedyDecoder(model, 128, backend="eager")
    with torch.inference_mode():
        decoder.warm_up([1, 3])
        graphs = counters["stats"]["unique_graphs"]
        for batch, prompt in ((1, 9), (3, 21), (1, 40)):
            x = torch.randint(2, 1000, (batch, prompt))
            ours = decoder(x, 12)
            theirs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
            assert torch.equal(ours, theirs), (batch, prompt)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step recompiled after warm-up"
