"""`dsrun generate` and `task=bench_infer` on CPU: runs just trained (full weights and LoRA) load and generate through
the engine, and the greedy output equals transformers' `generate` on the same weights (the engine's own tests:
tests/test_engine.py)."""

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
    # each answer under its prompt (the blank line is no prompt)
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("> ")] == ["> first?", "> second?"]


def test_think_splitter_and_detokenizer():
    from dsrun.inference.chat import ThinkSplitter

    split = ThinkSplitter(thinking=False)
    pieces = split.feed("a<thi") + split.feed("nk>b</think>c") + split.flush()
    assert pieces == [(False, "a"), (True, "b"), (False, "c")]
    assert ThinkSplitter(thinking=True).feed("x</think>y") == [(True, "x"), (False, "y")]


def test_bench_infer_runs_on_cpu_and_prints_its_table(tmp_path):
    """The run's own `quant` is what it measures (bench_infer.quants=null): quant=int8 was silently measured as
    none before."""
    import json

    proc = dsrun("task=bench_infer", "model=tiny_qwen2", "hardware=cpu", "quant=int8", "bench_infer.batches=[1,2]",
                 "bench_infer.prompt_tokens=16", "bench_infer.new_tokens=4", "bench_infer.concurrent=4",
                 run_dir=tmp_path / "bench")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode_tok_s" in proc.stdout and "hf_generate" in proc.stdout
    rows = json.loads((tmp_path / "bench" / "bench_infer.json").read_text())
    assert [(r["case"], r["batch"]) for r in rows] == [("dsrun_engine", 1), ("dsrun_engine", 2),
                                                       ("dsrun_engine_concurrent", 4), ("hf_generate", 1),
                                                       ("hf_generate", 2)]
    assert rows[2]["max_batch_seen"] == 4, "the engine decoded the concurrent requests together"
    assert {r["quant"] for r in rows} == {"int8"}
    assert "quant=int8" in proc.stderr
