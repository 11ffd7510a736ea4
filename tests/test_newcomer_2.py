"""Issue 31: a newcomer's first hour, part 2. One test (or a few) per numbered item of the issue, each failing on
the code before; real `dsrun` runs (forked, tests/forkserver.py) for what the user sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dsrun.data import build_datasets, load_tokenizer, unique
from dsrun.sources import SOURCES
from tests.conftest import FAST, REPO, assert_user_error, dsrun, model_cfg


# 1. The wheel runs outside the checkout --------------------------------------------------------------------------

def test_1_the_wheel_runs_a_chat_fine_tune_and_export_outside_the_checkout(tmp_path):
    """Built as a wheel and installed into a folder of its own, dsrun finds its configs and chat template inside
    the package (they used to live beside it, in the checkout only)."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    site = tmp_path / "site"
    wheel = next((tmp_path / "dist").glob("dsrun-*.whl"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsrun", *args], capture_output=True, text=True, env=env,
                              cwd=elsewhere, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import dsrun; print(dsrun.__file__)"], capture_output=True,
                           text=True, env=env, cwd=elsewhere)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    proc = run(*FAST, "train.max_steps=1", "train.seq_len=64", "train.micro_batch=2", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data.train_on=assistant" in proc.stderr  # the chat template rendered the assistant-only loss
    proc = run("export", "run", "exported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (elsewhere / "exported" / "config.json").is_file()


# 2. Eval rows are never copies of training rows ------------------------------------------------------------------

def test_2_eval_split_drops_duplicates_and_says_how_many(tmp_path):
    proc = dsrun(*[a for a in FAST if not a.startswith("data.num_samples")], "data.num_samples=4000",
                 "data.eval_split=0.05", "train.max_steps=1", "train.eval_every=1", "train.seq_len=64",
                 run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: data:"))
    records = SOURCES["reasoning"].records(OmegaConf.load(tmp_path / "run" / "config.yaml").data)
    kept, dropped = unique(records)
    assert dropped > 0 and f"{dropped} duplicate records dropped before the eval split" in line
    assert f"{len(kept) - round(len(kept) * 0.05)} records ->" in line


def test_2_no_eval_record_has_a_copy_in_train():
    data = OmegaConf.create({"source": "reasoning", "num_samples": 4000, "seed": 0, "eval_split": 0.05,
                             "eval_path": None, "train_on": "assistant", "packing": False, "document_mask": True,
                             "name": "reasoning"})
    tokenizer = load_tokenizer(model_cfg("tiny"))
    train, held, _ = build_datasets(data, tokenizer, 512, 129280)
    as_rows = lambda blocks: {tuple(row.tolist()) for row in blocks.inputs}  # noqa: E731
    assert not as_rows(train) & as_rows(held)


# 3. A tokenizer that is not the weights' is refused; the folder's own is the default ------------------------------

def qwen_folder(folder: Path, **special: int) -> Path:
    """A tiny Qwen2 model saved as Hugging Face does, with the special-token ids its config.json names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**OmegaConf.to_container(model_cfg("tiny_qwen2").fields), "vocab_size": 151936, **special}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields)).save_pretrained(folder)
    return folder


TINY = [*FAST, "train.micro_batch=1", "train.seq_len=32", "train.max_steps=1", "model=tiny_qwen2",
        "model.init=pretrained"]


def test_3_deepseek_tokenizer_on_qwen_weights_is_refused_before_the_first_step(tmp_path):
    base = qwen_folder(tmp_path / "qwen", eos_token_id=151643, bos_token_id=151643)  # Qwen2.5's, no tokenizer
    for choice in ("auto", "deepseek"):  # auto: the folder has no tokenizer of its own, so DeepSeek's
        proc = dsrun(*TINY, f"model.path={base}", f"model.tokenizer={choice}", run_dir=tmp_path / choice)
        assert_user_error(proc, "eos_token_id is 1, the weights' is 151643", "the model would read its ids as other")
        assert not (tmp_path / choice / "metrics.jsonl").exists()


def test_3_the_weights_folder_tokenizer_is_the_default(tmp_path):
    from dsrun.data import load_tokenizer

    base = qwen_folder(tmp_path / "qwen", eos_token_id=1, bos_token_id=0)
    tokenizer = load_tokenizer(OmegaConf.merge(model_cfg("tiny_qwen2"), {"tokenizer": "deepseek"}))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|only-in-this-folder|>"]})
    tokenizer.save_pretrained(base)
    proc = dsrun(*TINY, f"model.path={base}", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").model.tokenizer == "model"
    saved = json.loads((tmp_path / "run" / "model" / "tokenizer.json").read_text())
    assert any(t["content"] == "<|only-in-this-folder|>" for t in saved["added_tokens"])


# 4. A misspelt group is one line with the closest key (was a 70-line traceback) ---------------------------------

def test_4_misspelt_group_names_the_closest_key():
    for typo, meant in (("trian.max_steps=5", "train.max_steps"), ("optimm.lr=1", "optim.lr"),
                        ("tarin.seq_len=4", "train.seq_len")):
        assert_user_error(dsrun(*FAST, typo), f"{typo.split('=')[0]}: no such key; did you mean {meant}?")
