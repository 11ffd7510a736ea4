"""A run folder is append-only history (dsrun/run/folder.py), and every message about a checkpoint is read from the
disk: the issue #15 reproductions, run for real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, REPO, assert_user_error, dsrun, read_metrics, small_vocabulary
from tests.conftest import start as start_dsrun

JOB = [*FAST, *small_vocabulary(), "train.max_steps=2", "train.seq_len=32", "train.micro_batch=2",
       "train.checkpoint_every=0"]


def files(run: Path) -> dict[str, bytes]:
    kept = ("checkpoints", "model", ".hydra", "config.yaml")
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] in kept}


def wait_for(condition, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_following_the_advice_never_erases_a_run_and_a_resume_keeps_the_snapshot(tmp_path):
    """Item 1: another config in a `tiny` run's folder is refused, and so is train.resume=never on top of it; the
    run still resumes afterwards. Item 3: a resume with an allowed override keeps the original snapshot and records
    the resume beside it."""
    run = tmp_path / "X"
    first = dsrun(*JOB, run_dir=run)
    assert first.returncode == 0, first.stderr[-2000:]
    before = files(run)

    other = dsrun(*JOB, "model=tiny_qwen2", run_dir=run)
    assert_user_error(other, "holds a run with another config", "model.name: tiny -> tiny_qwen2", "hydra.run.dir")
    again = dsrun(*JOB, "model=tiny_qwen2", "train.resume=never", run_dir=run)
    assert_user_error(again, "holds a run with another config")
    same = dsrun(*JOB, "train.resume=never", run_dir=run)
    assert_user_error(same, "train.resume=never", "step-00000002", "train.overwrite=true")
    assert files(run) == before, "checkpoints, weights and snapshots are untouched"

    resumed = dsrun("resume", str(run), "train.max_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in resumed.stderr
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3]
    for snapshot in (run / ".hydra" / "config.yaml", run / "config.yaml"):
        assert yaml.safe_load(snapshot.read_text())["train"]["max_steps"] == 2, f"{snapshot} is the original"
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "train.max_steps=2" in overrides and "train.seq_len=32" in overrides, "the original overrides are kept"
    (record,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert "train.max_steps=3" in record["overrides"]
    assert record["changed"] == {"train.max_steps": [2, 3]}
    assert record["time"] and "git_commit" in record and record["host"]

    # the explicit way out replaces the run, and only then (a damaged ledger costs training only a warning)
    ledger = tmp_path / "damaged.sqlite"
    ledger.write_bytes(b"not a database" * 100)
    replaced = dsrun(*JOB, "model=tiny_qwen2", "train.overwrite=true", run_dir=run, env={"DSRUN_LEDGER": str(ledger)})
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "train.overwrite=true: replaced the run" in replaced.stderr
    assert f"dsrun: warning: the ledger {ledger} was not updated" in replaced.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "tiny_qwen2"
    assert not (run / "resumes.jsonl").exists()


def test_sigterm_with_checkpoints_off_says_nothing_was_saved_and_a_second_run_is_locked_out(tmp_path):
    """Item 2: SIGTERM with train.checkpoint_every=-1 says no checkpoint was written and how many steps are lost.
    Item 3: a second dsrun on the folder while the first runs is refused, naming the owner."""
    run = tmp_path / "Y"
    proc = start_dsrun(*FAST, "train.max_steps=500", "train.seq_len=32", "train.micro_batch=2",
                       f"hydra.run.dir={run}")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, proc)

    second = dsrun("resume", str(run))
    assert_user_error(second, f"{run} is in use by pid {proc.pid}", "wait for that run to end")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stderr = proc.stderr.read()
    step = read_metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {step}; no checkpoint was written" in stderr, stderr
    assert f"all {step} steps are not saved" in stderr and "checkpoint saved" not in stderr
    assert not (run / "checkpoints").exists()
    assert (run / ".dsrun.lock").read_text() == "", "a clean exit releases the lock"

    # no checkpoint was ever saved, so nothing a checkpoint held is lost: `resume` does what the stop said, starts
    # over at step 0, and sets the old rows (and half a line a kill left) aside instead of dropping them
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 99, "lo')  # half a line (a kill mid-write)
    again = dsrun("resume", str(run), "train.max_steps=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"stopped at step {step} without a checkpoint saved (train.checkpoint_every=-1)" in again.stderr
    assert "resumed from" not in again.stderr
    aside = (run / "metrics.set_aside.jsonl").read_text().splitlines()
    assert len(aside) == step + 1 and aside[-1] == '{"step": 99, "lo'
    assert [row["step"] for row in read_metrics(run)] == [1, 2]


def test_a_lock_left_by_a_killed_run_is_reported_and_taken_over(tmp_path):
    run = tmp_path / "Z"
    run.mkdir()
    (run / ".dsrun.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "time": "yesterday"}))
    proc = dsrun(*FAST, "task=dry_run", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "was locked by pid 999999 on gone" in proc.stderr and "taking the folder over" in proc.stderr


def test_collective_timeout_names_only_a_checkpoint_that_exists(tmp_path):
    """A save the timeout cut short leaves only `step-N.incomplete`: the message says no checkpoint exists; with a
    complete one beside it, the message names that one."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004.incomplete").mkdir(parents=True)
    script = ("import sys; from pathlib import Path; from omegaconf import OmegaConf; from dsrun.tasks import "
              "collective_timeout; collective_timeout(OmegaConf.create({'parallel': {'timeout_s': 5}}), "
              "Path(sys.argv[1]), RuntimeError('Gloo timed out'))")

    def timeout_message() -> str:
        proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert proc.returncode == 4, proc.stderr[-2000:]
        return proc.stderr

    stderr = timeout_message()
    assert "No complete checkpoint exists" in stderr and "starts over at step 0" in stderr
    assert "intact" not in stderr
    complete = run / "checkpoints" / "step-00000002"
    complete.mkdir()
    (complete / "COMPLETE").write_text("2\n")
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    assert f"The last complete checkpoint ({complete}) is intact: dsrun resume {run}" in timeout_message()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_ends_with_one_line_and_a_ledger_row(tmp_path, sig):
    """SIGTERM or Ctrl-C (SIGINT) while the data is being built (before the loop's own handlers): one line, exit
    128 + the signal, the run's record says interrupted."""
    run = tmp_path / "run"
    proc = start_dsrun(*FAST, "data.num_samples=400000", "train.max_steps=2", f"hydra.run.dir={run}")
    wait_for(lambda: (run / "config.yaml").is_file(), proc)  # written by fit, right before the data
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    name = signal.Signals(sig).name
    assert code == 128 + sig, stderr
    assert f"dsrun: stopped by {name} outside the training steps (start-up" in stderr, stderr
    assert "no complete checkpoint exists" in stderr and "Traceback" not in stderr
    assert json.loads((run / "record.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("where", ["model fields", "chat template"])
def test_a_signal_inside_a_start_up_step_that_turns_failures_into_user_errors_stays_a_signal(where, monkeypatch):
    """Start-up steps that report any failure as a fault in the user's input (the model's fields, a chat the template
    refuses) let the signal's Interrupted through: a CI run got exit 2 and "model.fields of model=tiny: stopped by
    SIGINT" from a Ctrl-C that landed while the config was built."""
    from dsrun import chat, model
    from dsrun.errors import Interrupted
    from tests.conftest import model_cfg

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGINT)

    with pytest.raises(Interrupted):
        if where == "model fields":
            import transformers

            monkeypatch.setattr(transformers.AutoConfig, "for_model", interrupted)
            model.architecture(model_cfg("tiny"))
        else:
            tokenizer = type("Tokenizer", (), {"apply_chat_template": staticmethod(interrupted)})()
            chat._apply(tokenizer, [{"role": "user", "content": "hi"}], [], "chats.jsonl:1")


def test_a_signal_inside_an_omegaconf_accessor_still_ends_with_its_one_line(monkeypatch):
    """OmegaConf re-raises an exception from inside its attribute access as type(exception)(message + key lines)
    (a SIGINT handler raised Interrupted while setup read cfg.model): Interrupted rebuilt that way keeps its signal
    (the exit code) and its one line. It raised ValueError ('... is not a valid Signals') before."""
    from omegaconf import DictConfig, OmegaConf

    from dsrun.errors import Interrupted

    cfg = OmegaConf.create({"model": {"experts_implementation": "eager"}})
    model = cfg.model

    get_node, fired = DictConfig._get_node, []

    def signal_arrives(self, *args, **kwargs):  # where the handler fired in the failing run: inside __getattr__
        if not fired:
            fired.append(True)
            raise Interrupted(signal.SIGINT)
        return get_node(self, *args, **kwargs)

    monkeypatch.setattr(DictConfig, "_get_node", signal_arrives)
    with pytest.raises(Interrupted) as caught:
        model.experts_implementation
    assert caught.value.signum == signal.SIGINT
    assert str(caught.value) == "stopped by SIGINT before the run started; nothing was trained or saved"
