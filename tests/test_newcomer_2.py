"""Issue 31: a newcomer's first hour, part 2. One test (or a few) per numbered item of the issue, each failing on
the code before; real `dsrun` runs (forked, tests/forkserver.py) for what the user sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dsrun.data import build_datasets, load_tokenizer, unique
from dsrun.sources import SOURCES
from tests.conftest import FAST, REPO, assert_user_error, dsrun, model_cfg, read_metrics, start


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
    proc = run("+recipe=1x3060_qlora", "task=plan")  # the recipes ship too
    assert proc.returncode == 0 and "fits" in proc.stdout, proc.stdout + proc.stderr[-2000:]
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


# 5. A run trained by epochs can be extended -------------------------------------------------------------------------

EPOCHS = [*FAST, "data.num_samples=32", "train.seq_len=64", "train.micro_batch=4", "train.max_steps=null",
          "train.epochs=1", "train.checkpoint_every=0"]  # 32 rows, 4 per step: 8 steps an epoch


def test_5_a_run_by_epochs_continues_by_epochs_or_to_a_step(tmp_path):
    run = tmp_path / "run"
    assert dsrun(*EPOCHS, run_dir=run).returncode == 0
    proc = dsrun("resume", str(run), "train.epochs=2")  # was: refused as another config (1 -> 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and [m["step"] for m in read_metrics(run)] == list(range(1, 17))
    proc = dsrun("resume", str(run), "train.max_steps=20")  # was: "set train.max_steps=null to train by epochs"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(run)[-1]["step"] == 20
    assert json.loads((run / "summary.json").read_text())["epochs"] == 20 / 8


# 7. The summary counts the epochs done, and one definition of an epoch -----------------------------------------------

def test_7_a_stopped_run_reports_the_epochs_it_trained(tmp_path):
    run = tmp_path / "run"
    proc = start(*EPOCHS, "train.epochs=500", "train.log_every=1", f"hydra.run.dir={run}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not (run / "metrics.jsonl").is_file()
                                           or len(read_metrics(run)) < 12):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] != "completed" and 12 <= summary["steps"] < 4000
    assert summary["epochs"] == summary["steps"] / 8  # was the 500 planned
    # both per-epoch token counts are of the 32 rows an epoch takes: processed, and labelled among them
    assert summary["tokens_per_epoch"] == 32 * 64 and 0 < summary["trained_tokens_per_epoch"] <= 32 * 64


# 8. `resume RUN` shows the run's options and only the user's overrides --------------------------------------------

def test_8_resume_shows_the_runs_options_and_only_what_the_user_typed(tmp_path):
    run = tmp_path / "run"
    small = [a for a in EPOCHS if not a.startswith("monitor")]  # the console monitor prints the config lines
    assert dsrun(*small, run_dir=run).returncode == 0
    proc = dsrun("resume", str(run))
    config = next(ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: config:"))
    assert "hardware=cpu" in config and "model=tiny" in config and "optim=adamw" in config, config
    assert "dsrun: overrides:" not in proc.stderr  # train.resume=auto and train.micro_batch=4 are the verb's
    proc = dsrun("resume", str(run), "train.epochs=2", "train.log_every=3")
    assert "dsrun: overrides: train.epochs=2 train.log_every=3\n" in proc.stderr, proc.stderr


# 9. The summary table is a result: stdout ---------------------------------------------------------------------------

def test_9_summary_table_on_stdout_progress_on_stderr(tmp_path):
    proc = dsrun(*[a for a in EPOCHS if not a.startswith("monitor")], run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dsrun: completed" in proc.stdout and "final_loss" in proc.stdout and "final_loss" not in proc.stderr
    assert "step 8  loss" in proc.stderr and "step 8" not in proc.stdout


# 11. The schedule ends at its floor -------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_11_the_last_step_trains_at_the_floor(tmp_path, schedule):
    proc = dsrun(*FAST, "train.max_steps=6", "train.seq_len=32", "train.micro_batch=1", "train.lr=1e-3",
                 f"optim.schedule={schedule}", "optim.min_lr_ratio=0.1", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run")]
    assert lrs[-1] == pytest.approx(1e-4) and lrs[-2] > 1e-4, lrs  # was one decrement above it


# 6. Commands that keep nothing leave no folder; doctor names where its report went ---------------------------------

def test_6_generate_and_refused_commands_leave_no_run_folder_and_doctor_names_its_report(tmp_path):
    run = tmp_path / "run"
    assert dsrun(*EPOCHS, run_dir=run).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    proc = dsrun("generate", str(run), "hi", "generate.max_new_tokens=2", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dsrun("generate", str(tmp_path / "missing"), "hi", cwd=work).returncode == 2
    assert dsrun(*FAST, "train.max_steps=abc", cwd=work).returncode == 2
    assert not [p for p in (work / "outputs" / "runs").rglob("*")] if (work / "outputs").exists() else True
    proc = dsrun("doctor", "hardware=cpu", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [report] = (work / "outputs" / "runs").glob("*/doctor.json")
    assert f"report saved as {report}" in proc.stdout


# 10. Export: quiet, says its dtype, files readable by others -------------------------------------------------------

def test_10_export_is_quiet_says_its_dtype_and_writes_readable_files(tmp_path):
    run = tmp_path / "lora"
    assert dsrun(*EPOCHS, "adapter=lora", "train.max_steps=2", "train.epochs=null", run_dir=run).returncode == 0
    proc = dsrun("export", str(run), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"dsrun: exported {run} -> {tmp_path / 'out'} (16.6 M parameters in "
                                        "bfloat16)"], proc.stderr  # no peft/transformers/bitsandbytes warning or bar
    full = tmp_path / "full"
    assert dsrun(*EPOCHS, "train.max_steps=1", "train.epochs=null", run_dir=full).returncode == 0
    proc = dsrun("export", str(full), str(tmp_path / "bf16"))
    assert "in bfloat16; the run's weights are float32: `dsrun export RUN OUT --dtype float32` keeps them so" in \
        proc.stderr, proc.stderr  # was: bfloat16 without a word
    proc = dsrun("export", str(run), str(tmp_path / "fp32"), "--dtype", "float32")
    assert proc.returncode == 0 and json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    umask = os.umask(0)
    os.umask(umask)
    for folder in (tmp_path / "out", tmp_path / "fp32", run / "model"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors was 0600


# 12. Piped prompts: each answer labelled, no leading blank lines ---------------------------------------------------

def test_12_piped_prompts_are_labelled_and_answers_start_with_text(tmp_path):
    run = tmp_path / "run"
    assert dsrun(*EPOCHS, run_dir=run).returncode == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\nwhat is 2+2?\n")
    proc = dsrun("generate", str(run), f"generate.prompts_file={prompts}", "generate.max_new_tokens=6",
                 "generate.show_thinking=show")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "> hi" and "> what is 2+2?" in lines, proc.stdout
    answers = [lines[1], lines[lines.index("> what is 2+2?") + 1]]
    assert all(a and not a[0].isspace() for a in answers), proc.stdout


def test_12_readme_lists_every_hardware_option_and_every_run_file():
    readme = (REPO / "README.md").read_text()
    for option in (REPO / "dsrun" / "conf" / "hardware").glob("*.yaml"):
        assert f"`{option.stem}`" in readme, f"hardware={option.stem} missing from the README"
    from dsrun.run.folder import RUN_FILES

    for name in RUN_FILES:
        if not name.startswith("."):
            assert f"`{name}`" in readme, f"{name} missing from the README's run folder table"
