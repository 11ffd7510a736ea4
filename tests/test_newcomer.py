"""Issue 19: a newcomer's first hour. One test (or a few) per item of the issue, each failing on the code before.

In process where no process boundary is under test; real `dsrun` runs (forked, tests/forkserver.py) for what the
user sees: exit codes, console lines, run folders, the ledger.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dsrun.config import validate
from dsrun.schema import register_configs
from dsrun.resolve import resolve
from dsrun.errors import ConfigError
from dsrun.hardware import gpu_catalog
from tests.conftest import FAST, REPO, THIRD_PARTY, assert_user_error, dsrun, read_metrics

CONF = REPO / "conf"


@pytest.fixture(scope="module")
def composer():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        def composed(*overrides: str):
            cfg = compose(config_name="config", overrides=["hardware=cpu", *overrides])
            resolve(cfg)
            validate(cfg, gpu_catalog())
            return cfg
        yield composed


# 1. A key the user adds is used or refused ----------------------------------------------------------------------

def test_1_added_key_nothing_reads_is_refused_with_the_closest_key():
    proc = dsrun("+optim.schedule=constant", "+train.epochs=1", "train.max_steps=3", "train.log_every=1",
                 "optim.warmup_steps=0", *FAST)  # the reproduction: both keys exist now, without a +
    assert_user_error(proc, "+optim.schedule: already a key; set it without the +: optim.schedule=constant",
                      "+train.epochs: already a key")
    proc = dsrun("+optim.schedul=constant", "+optim.epochs=1", *FAST)
    assert_user_error(proc, "+optim.schedul: no code reads this key", "did you mean optim.schedule?",
                      "+optim.epochs: no code reads this key", "did you mean train.epochs?")
    # the + hint only where adding a key is meaningful (a free-form node)
    assert "+train.micro_bach" not in dsrun("train.micro_bach=4", *FAST).stderr
    assert_user_error(dsrun("data.path=x.jsonl", *FAST), "data.path: data.source=reasoning does not use it")
    assert_user_error(dsrun("model.fields.rope_theta=1.0", *FAST), "+model.fields.rope_theta=...")


def test_1_added_field_of_a_free_form_node_is_read(composer):
    cfg = composer("+model.fields.rms_norm_eps=0.001", "task=dry_run")
    from dsrun.model import architecture

    assert architecture(cfg.model).rms_norm_eps == 0.001


# 2. Resuming with a larger train.max_steps keeps the learning rate continuous ----------------------------------

def test_2_longer_resume_keeps_the_learning_rate_continuous(tmp_path):
    run = tmp_path / "run"
    common = ["hardware=cpu", "monitor=none", "train.log_every=1", "train.micro_batch=1", "train.seq_len=32",
              "data.num_samples=64", "optim.warmup_steps=0"]
    first = dsrun(*common, "train.max_steps=4", run_dir=run)
    assert first.returncode == 0, first.stderr
    resumed = dsrun("resume", str(run), "train.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr
    lrs = [row["lr"] for row in read_metrics(run)]
    assert len(lrs) == 8
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lrs, lrs[1:])), f"the lr rose on resume: {lrs}"
    assert lrs[-1] == pytest.approx(3e-3 * 0.1)  # past the horizon: the floor


def test_2_schedules_and_their_resume_rule(composer):
    from dsrun.schedule import horizon_on_resume, lr_factor

    for kind in ("cosine", "linear", "constant", "wsd"):
        opt = composer(f"optim.schedule={kind}", "train.max_steps=100", "optim.warmup_steps=10").optim
        f = lr_factor(opt, 100)
        assert f(0) == pytest.approx(1 / 11) and f(10) == pytest.approx(1.0)
        assert f(100) == pytest.approx(1.0 if kind == "constant" else 0.1), kind
        # every extension of the run continues the learning rate as the run would have gone on
        for stop in (5, 50, 85, 100):
            g = lr_factor(opt, horizon_on_resume(opt, 100, 300, stop))
            for step in range(stop - 1, stop + 3):
                assert g(step) == pytest.approx(f(step)), (kind, stop, step)
    wsd = composer("optim.schedule=wsd", "train.max_steps=100").optim
    assert horizon_on_resume(wsd, 100, 300, 50) == 300  # stable phase: the decay moves to the new end
    assert horizon_on_resume(wsd, 100, 300, 90) == 100  # already decaying: it stays


# 3. Real models' fine-tuning defaults; warmup checked; schedules ------------------------------------------------

def test_3_model_options_carry_fine_tuning_defaults(composer):
    real = composer("model=r1_distill_qwen_7b", "task=dry_run")
    assert (real.train.lr, real.train.seq_len) == (1e-5, 2048)
    assert composer("model=r1_distill_qwen_7b", "adapter=lora", "task=dry_run").train.lr == 2e-4
    tiny = composer()
    assert (tiny.train.lr, tiny.train.seq_len) == (3e-3, 128)
    chosen = composer("model=r1_distill_qwen_7b", "train.lr=3e-5", "train.seq_len=512", "task=dry_run")
    assert (chosen.train.lr, chosen.train.seq_len) == (3e-5, 512)


def test_3_dry_run_shows_the_model_defaults_and_warmup_is_checked(composer):
    proc = dsrun("model=r1_distill_qwen_1_5b", "task=dry_run", "hardware=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 1.0e-05" in proc.stdout and "seq_len: 2048" in proc.stdout
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=20: the run is 10 steps long"):
        composer("optim.warmup_steps=20", "train.max_steps=10")
    with pytest.raises(ConfigError, match=r"optim.schedule=step: unknown; choose one of cosine, linear, constant, wsd"):
        composer("optim.schedule=step")


# 4. Bad input is found before the start, and booked as refused ----------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("data=jsonl data.path=missing.jsonl", "data.path=missing.jsonl: no such file"),
    ("data.eval_path=missing.jsonl", "data.eval_path=missing.jsonl: no such file"),
    ("model.path=/no/such/folder", "model.path=/no/such/folder: no such folder"),
])
def test_4_missing_files_are_found_before_hydra_starts(tmp_path, override, message):
    (tmp_path / "train.jsonl").write_text('{"text": "some text"}\n')
    extra = ["data=jsonl", f"data.path={tmp_path / 'train.jsonl'}"] if "eval" in override else []
    extra += ["model.init=pretrained"] if "model.path" in override else []
    proc = dsrun(*FAST, *extra, *override.split(), run_dir=tmp_path / "run")
    assert_user_error(proc, message)
    assert not (tmp_path / "run").exists()  # no folder, no Lightning start-up


def test_4_bad_data_in_a_run_is_refused_not_crashed_and_hidden_by_default(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    env = {"DSRUN_LEDGER": str(tmp_path / "ledger.sqlite")}
    proc = dsrun(*FAST, "data=jsonl", f"data.path={bad}", run_dir=tmp_path / "run", env=env)
    assert_user_error(proc, f"{bad}:2: malformed JSON")
    status = sqlite3.connect(tmp_path / "ledger.sqlite").execute("SELECT status FROM runs").fetchone()[0]
    assert status.startswith("refused: ") and "crashed" not in status, status
    assert str(tmp_path / "run") not in dsrun("runs", env=env).stdout
    assert str(tmp_path / "run") in dsrun("runs", "--all", env=env).stdout
    assert str(tmp_path / "run") in dsrun("runs", "--status", "refused", env=env).stdout


# 5. A LoRA run's weights load as the README says ------------------------------------------------------------------

def test_5_lora_run_folder_loads_as_pretrained_with_an_absolute_base(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml").fields)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields)).save_pretrained(tmp_path / "base")
    small = ["hardware=cpu", "monitor=none", "train.log_every=1", "train.checkpoint_every=-1", "train.micro_batch=1",
             "train.seq_len=32", "data.num_samples=32", "model=tiny_qwen2", "model.init=pretrained"]
    run = tmp_path / "lora"
    proc = dsrun(*small, "model.path=base", "adapter=lora", "train.max_steps=2", run_dir=run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trainable = re.search(r"parameters, ([\d,.]+)( M)? trainable", proc.stderr)
    assert trainable and trainable.group(1) not in ("0.0", "0"), proc.stderr
    assert "rank_pattern" not in proc.stderr and "Warning" not in proc.stderr  # peft's warnings: in the log only
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    again = dsrun(*small, f"model.path={run / 'model'}", "train.max_steps=1", run_dir=tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert math.isfinite(read_metrics(tmp_path / "again")[0]["loss"])


def test_5_lora_folder_merges_the_adapter_into_the_rebuilt_base(tmp_path, composer):
    import torch

    from dsrun.model import architecture, build_model

    run = tmp_path / "lora"
    proc = dsrun(*FAST, "adapter=lora", "train.max_steps=2", "train.micro_batch=1", "train.seq_len=32",
                 "data.num_samples=32", "train.lr=0.05", run_dir=run)
    assert proc.returncode == 0, proc.stderr
    cfg = composer("model.init=pretrained", f"model.path={run / 'model'}")
    loaded = build_model(cfg.model, architecture(cfg.model), seed=0)
    base = build_model(composer().model, architecture(composer().model), seed=42)  # the run's seed
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    unexpected = [n for n in changed if not any(k in n for k in ("proj", "lm_head", "experts", "mlp.gate"))]
    assert changed and not unexpected, unexpected


# 6. Quiet by default ------------------------------------------------------------------------------------------------



def test_6_default_job_console_is_short_and_stdout_holds_only_results(tmp_path):
    proc = dsrun("train.max_steps=5", "train.checkpoint_every=-1", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    # stdout is for results: the summary table alone (issue 31: it went to stderr)
    assert proc.stdout.splitlines()[1].startswith("┌") and "dsrun: completed" in proc.stdout, proc.stdout
    assert "dsrun: " not in proc.stdout.replace("dsrun: completed", "") and "step " not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("step ")]  # the bar's lines
    assert len(lines) <= 40, "\n".join(lines)
    assert not [ln for ln in lines if THIRD_PARTY.search(ln)], proc.stderr
    assert "bench_infer" not in proc.stderr  # the config tree is folded
    assert "dsrun: config: hardware=auto" in proc.stderr
    assert f"weights              │ {tmp_path / 'run' / 'model'}" in proc.stdout  # not cut at 80 columns


def test_6_two_process_run_prints_lightning_lines_nowhere_on_the_console(tmp_path):
    proc = dsrun(*FAST, "hardware.devices=2", "parallel=ddp", "train.max_steps=1", "train.micro_batch=1",
                 "train.seq_len=32", "data.num_samples=16", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if THIRD_PARTY.search(ln)], proc.stderr
    assert proc.stdout.strip() == ""  # monitor=none: no summary table either
    assert "distributed_backend" in (tmp_path / "run" / "dsrun.log").read_text()  # kept in the run's log


# 7. Where things go ---------------------------------------------------------------------------------------------------

def test_7_dry_run_and_plan_leave_no_folder_and_other_monitors_keep_the_summary(tmp_path):
    for task in ("task=dry_run", "task=plan"):
        proc = dsrun(task, "hardware=cpu", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "outputs" / "runs").iterdir())
    proc = dsrun("hardware=cpu", "monitor=tensorboard", "train.max_steps=2", "train.log_every=1", "-v",
                 "train.checkpoint_every=-1", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "step 2  loss" in proc.stderr and "dsrun: completed" in proc.stdout  # the progress and summary stayed
    assert "bench_infer" in proc.stderr  # -v: the whole config tree
    assert list((tmp_path / "run" / "tensorboard").iterdir())


# 8. Discoverability ---------------------------------------------------------------------------------------------------

def test_8_help_lists_every_verb_and_task_then_hydras_help():
    from dsrun.cli import COMMANDS, VERBS
    from dsrun.config import TASKS

    proc = dsrun("--help")
    assert proc.returncode == 0, proc.stderr
    for word in [*VERBS, *COMMANDS, *TASKS]:
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"  {word} ")), None)
        assert line and len(line.split()) > 2, f"{word} has no line of its own"
    assert proc.stdout.index("Verbs:") < proc.stdout.index("== Configuration groups ==")


def test_8_unknown_verb_is_one_line_with_the_closest_verb():
    assert_user_error(dsrun("merge", "a", "b"), "merge: no such verb; did you mean `dsrun export`?")
    assert_user_error(dsrun("reprot"), "did you mean `dsrun report`?")
    assert len(dsrun("merge").stderr.strip().splitlines()) == 1


def test_8_readme_says_once_how_to_activate_the_environment():
    readme = (REPO / "README.md").read_text()
    assert readme.count("source .venv/bin/activate") == 1
    assert ".venv/bin/python -m dsrun" not in readme.split("source .venv/bin/activate", 1)[1]
