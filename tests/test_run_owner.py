"""One owner per run folder, no "continuing" over lost history, no writes into folders dsrun did not make: the
reproductions of issue #28, each on the real CLI, and a property test of many commands aimed at one finished run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from dsrun.run.folder import nothing_to_continue
from tests.conftest import FAST, assert_user_error, dsrun, read_metrics, small_vocabulary
from tests.conftest import start as start_dsrun

JOB = [*FAST, *small_vocabulary(), "train.max_steps=2", "train.seq_len=32", "train.micro_batch=2",
       "train.checkpoint_every=0"]


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file (name -> sha256 of its bytes) and every folder: any write, removal or addition shows. An empty
    lock file is a released lock (a refused command takes the lock before it checks, and gives it back)."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            seen[rel + "/"] = ""
        elif path.name == ".dsrun.lock":
            seen[rel] = "lock:" + ("held" if path.stat().st_size else "free")
        else:
            seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("owner") / "R"
    proc = dsrun(*JOB, run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def hold_lock(folder: Path) -> int:
    fd = os.open(folder / ".dsrun.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, json.dumps({"pid": 4242, "host": "elsewhere", "time": "now"}).encode(), 0)
    return fd


def test_a_second_process_cannot_train_into_a_live_run_whatever_the_override_spelling(finished, tmp_path):
    """`++hydra.run.dir=X` (and `+`-free spellings alike) used to bypass the owner check: B "resumed" A's run while A
    trained, metrics interleaved, `.hydra` rewritten."""
    run = copy_of(finished, tmp_path / "X")
    holder = hold_lock(run)
    try:
        before = tree_hash(run)
        for spelling in ("hydra.run.dir", "++hydra.run.dir"):
            proc = dsrun(*JOB, "train.max_steps=30", "train.lr=0.01", f"{spelling}={run}")
            assert_user_error(proc, f"{run} is in use by pid 4242 on elsewhere", "choose another hydra.run.dir")
            assert tree_hash(run) == before
    finally:
        os.ftruncate(holder, 0)
        os.close(holder)


def test_a_refused_run_through_an_interpolated_folder_leaves_the_finished_run_alone(finished, tmp_path):
    """`hydra.run.dir=${oc.env:RUNX}` used to skip the folder check: the finished run's .hydra and record.json were
    rewritten for another model and it could never be resumed again."""
    run = copy_of(finished, tmp_path / "R")
    before = tree_hash(run)
    proc = dsrun(*JOB, "model=tiny_qwen2", "hydra.run.dir=${oc.env:RUNX}", env={"RUNX": str(run)})
    assert_user_error(proc, f"hydra.run.dir={run} holds a run with another config", "model.name: tiny -> tiny_qwen2")
    assert tree_hash(run) == before
    again = dsrun("resume", str(run), "train.max_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'}" in again.stderr


def test_a_folder_of_the_users_own_files_is_never_written(tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "model" / "config.json").write_text('{"mine": true}\n')
    before = tree_hash(mine)
    proc = dsrun(*JOB, run_dir=mine)
    assert_user_error(proc, "holds files dsrun did not write (config.yaml, model/)", "choose a new hydra.run.dir")
    assert tree_hash(mine) == before


def test_continuing_needs_a_checkpoint(finished, tmp_path):
    """With checkpoints/ gone, `resume` said "continuing the run" and retrained from step 1 over metrics.jsonl
    and model/."""
    run = copy_of(finished, tmp_path / "R")
    shutil.rmtree(run / "checkpoints")
    before = tree_hash(run)
    proc = dsrun("resume", str(run), "train.max_steps=4")
    assert_user_error(proc, "holds a trained run but no checkpoint to continue from: it finished: model/ holds its "
                      "weights, and checkpoints/ holds none now", "train.overwrite=true")
    assert "continuing the run" not in proc.stderr
    assert tree_hash(run) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    """The other side of the refusal above: killed (-9) before its first checkpoint was due, a run lost nothing a
    checkpoint held; `resume` replays its steps from step 1, as any resume replays those after its last save (the
    refusal broke the kill -9 resume test in CI)."""
    run = tmp_path / "R"
    proc = start_dsrun(*FAST, "train.max_steps=200", "train.seq_len=32", "train.micro_batch=2",
                       "train.checkpoint_every=100", f"hydra.run.dir={run}")
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().endswith("\n")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
    assert logged and logged[-1] < 100 and not (run / "checkpoints").exists()
    again = dsrun("resume", str(run), "train.max_steps=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"stopped at step {logged[-1]} without a checkpoint saved (train.checkpoint_every=100)" in again.stderr
    assert [row["step"] for row in read_metrics(run)] == [1, 2]
    assert len((run / "metrics.set_aside.jsonl").read_text().splitlines()) >= len(logged), "set aside, not dropped"


@pytest.mark.parametrize("every, last, refused", [
    (2, 5, "it logged step 5, after its checkpoint at step 2 was due"),
    (5, 5, None),  # killed while its first checkpoint was being saved
    (0, 7, None), (-1, 7, None),
])
def test_a_checkpoint_once_due_and_now_gone_is_lost_history(tmp_path, every, last, refused):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                    for s in range(1, last + 1)))
    problem = nothing_to_continue(tmp_path, {"resume": "auto"}, every)
    assert problem == refused if refused is None else refused in problem
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted"}))  # a stop saves one when every >= 0
    problem = nothing_to_continue(tmp_path, {"resume": "auto"}, every)
    assert (problem is None) == (every == -1)


def test_sweep_trials_that_share_a_folder_are_refused_before_any_trial(tmp_path):
    """`hydra.sweep.subdir=same`: trial 1 "completed" by resuming trial 0 and the sweep named the wrong winner."""
    proc = dsrun("-m", *JOB, "train.lr=0.001,0.01", f"hydra.sweep.dir={tmp_path / 'sw'}", "hydra.sweep.subdir=same")
    assert_user_error(proc, "several trials of this sweep would write into", "${hydra.job.num}")
    assert not (tmp_path / "sw" / "same").exists()


def test_a_sweep_run_again_over_its_folder_with_other_values_is_refused(tmp_path):
    sweep = tmp_path / "sw"
    first = dsrun("-m", *JOB, "train.lr=0.001,0.01", f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_hash(sweep / "0")
    proc = dsrun("-m", *JOB, "train.lr=0.002,0.01", f"hydra.sweep.dir={sweep}")
    assert_user_error(proc, f"the trial folder {sweep / '0'} holds a run with another config",
                      "train.lr: 0.001 -> 0.002")
    assert tree_hash(sweep / "0") == before


def test_an_empty_run_folder_is_refused_not_the_current_folder(tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = dsrun(*JOB, "hydra.run.dir=", cwd=tmp_path)
    assert_user_error(proc, "hydra.run.dir= is empty", "name a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sigterm_early_in_start_up_is_one_line(tmp_path):
    """SIGTERM 0.8-2.2 s after start used to print Hydra's "Error executing job", a traceback about a partially
    initialised torch, once a SIGSEGV. Now: one line and 143, wherever start-up is."""
    for delay in (0.3, 0.9, 1.5, 2.1, 2.7):
        run = tmp_path / f"run{delay}"
        proc = start_dsrun(*JOB, "data.num_samples=20000", f"hydra.run.dir={run}")
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stderr = proc.stderr.read()
        if code == 0:
            continue  # it finished first
        assert code == 143, (delay, stderr)
        assert "Traceback" not in stderr and "Error executing job" not in stderr, (delay, stderr)
        assert "dsrun: stopped by SIGTERM" in stderr, (delay, stderr)


def test_several_nodes_without_a_launcher_fail_at_once_naming_it(tmp_path):
    """`hardware.num_nodes=2` without torchrun waited silently for the other node (1,800 s) and ignored SIGTERM."""
    started = time.time()
    proc = dsrun(*JOB, "hardware.num_nodes=2", run_dir=tmp_path / "run")
    assert_user_error(proc, "hardware.num_nodes=2", "torchrun --nnodes 2", "hardware.num_nodes=1")
    assert time.time() - started < 60


@pytest.fixture()
def held_ledger(tmp_path):
    """Another process holding the ledger in an open exclusive transaction (an old rollback-journal file, as a
    database tool leaves it)."""
    import subprocess
    import sys

    path = tmp_path / "ledger.sqlite"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('CREATE TABLE t (x)'); c.execute('BEGIN EXCLUSIVE'); c.execute('INSERT INTO t VALUES (1)')\n"
        "print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield path
    holder.kill()
    holder.wait()


def test_a_ledger_held_by_another_process_is_a_bounded_wait_then_one_line(held_ledger):
    """`dsrun runs` waited 50 x 60 s on a held ledger, deaf to SIGTERM (SQLite waits inside C)."""
    started = time.time()
    proc = dsrun("runs", env={"DSRUN_LEDGER": str(held_ledger)}, timeout=60)
    assert_user_error(proc, f"the ledger {held_ledger} is held by another process", "DSRUN_LEDGER")
    assert time.time() - started < 30


def test_sigterm_while_waiting_for_the_ledger_ends_the_command(held_ledger):
    proc = start_dsrun("runs", env={"DSRUN_LEDGER": str(held_ledger)})
    time.sleep(3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=15)
    assert time.time() - sent < 10
    stderr = proc.stderr.read()
    assert code == 143 and "Traceback" not in stderr and "stopped by SIGTERM" in stderr, stderr


def test_steps_with_no_trained_token_log_no_loss(tmp_path):
    """A record whose long user message fills every row: the steps had nothing to learn and logged loss 0.0, and
    the summary said final_loss 0.0."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 3000},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    run = tmp_path / "run"
    proc = dsrun(*FAST, "data.source=jsonl", f"data.path={data}", "train.max_steps=3", "train.seq_len=64",
                 "train.micro_batch=2", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [row["loss"] for row in read_metrics(run)] == [None, None, None]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] is None and summary["first_loss"] is None


def test_an_error_raised_while_a_memory_error_was_handled_is_that_memory_error():
    """Under hardware.memory_cap_gib=0.01 a run once got as far as its checkpoint: torch.save's buffer raised
    MemoryError, its zip writer then a RuntimeError ("unexpected pos"), and the user got a traceback."""
    import resource

    from dsrun.tasks import uncapped_on_failure

    def fit(cfg, folder):
        try:
            raise MemoryError()
        except MemoryError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1117760 vs 855508")

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (2**40 if hard == resource.RLIM_INFINITY else hard, hard))  # a cap set
    try:
        with pytest.raises(MemoryError, match=r"under hardware.memory_cap_gib \(\[enforce fail"):
            uncapped_on_failure(fit)(None, None)
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] == hard  # lifted
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def test_a_memory_cap_that_starves_start_up_is_one_line(tmp_path):
    """`hardware.memory_cap_gib=0.01` on CPU: a lazy import failed under the cap (SystemError), then the
    out-of-memory handler's own import did."""
    proc = dsrun(*JOB, "hardware.memory_cap_gib=0.01", run_dir=tmp_path / "run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "dsrun: out of host memory" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "resumes.jsonl"])
def test_run_files_that_are_folders_are_refused_before_the_run(finished, tmp_path, name):
    run = copy_of(finished, tmp_path / "R")
    (run / name).unlink(missing_ok=True)
    (run / name).mkdir()
    before = tree_hash(run)
    proc = dsrun("resume", str(run), "train.max_steps=3")
    assert_user_error(proc, f"{name} is not a file", "move it aside")
    assert tree_hash(run) == before


def test_an_export_onto_a_full_disk_leaves_nothing_behind(finished, tmp_path):
    from tests.test_bad_input import small_disk

    with small_disk(tmp_path, "256k") as mount:  # smaller than the tiny model's weights
        proc = dsrun("export", str(finished), str(mount / "out"))
        # (not assert_user_error: transformers' loading and writing bars share stderr)
        errors = [ln for ln in proc.stderr.splitlines() if "dsrun: error:" in ln]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and "No space left" in errors[0] and "nothing was left there" in errors[0], errors
        assert list(mount.iterdir()) == []


# Commands aimed at one finished run folder R ({R}; {T} a scratch folder): what each may do to it. "refused" and
# "reads" leave R byte-identical; "resumes" may only add to its history.
AIMED = [
    ("refused", [*JOB, "model=tiny_qwen2", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "train.seq_len=64", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "train.seed=3", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "data.num_samples=512", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "model=tiny_qwen2", "++hydra.run.dir={R}"]),
    ("refused", [*JOB, "model=tiny_qwen2", "hydra.run.dir=${{oc.env:RUNX}}"]),
    ("refused", [*JOB, "model=tiny_qwen2", "hydra.run.dir={R}/../{name}"]),
    ("refused", [*JOB, "train.resume=never", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "task=plan", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "task=dry_run", "hydra.run.dir={R}"]),
    ("refused", [*JOB, "hydra.run.dir={R}/checkpoints"]),
    ("refused", [*JOB, "hydra.run.dir={R}/model"]),
    ("refused", [*JOB, "hydra.run.dir={R}/.hydra"]),
    ("refused", [*JOB, "hydra.run.dir={R}/config.yaml"]),
    ("refused", [*JOB, "model=tiny_qwen2", "hydra.run.dir={R}", "hydra.output_subdir=elsewhere"]),
    ("refused", ["-m", *JOB, "train.lr=0.1,0.2", "hydra.sweep.dir={R}"]),
    ("refused", ["-m", *JOB, "train.lr=0.1,0.2", "hydra.sweep.dir={parent}", "hydra.sweep.subdir={name}"]),
    ("refused", ["-m", *JOB, "train.seed=7", "hydra.sweep.dir={parent}", "hydra.sweep.subdir={name}"]),
    ("refused", ["resume", "{R}", "model=tiny_qwen2"]),
    ("refused", ["resume", "{R}", "train.seq_len=64"]),
    ("refused", ["resume", "{R}", "train.seed=9"]),
    ("refused", ["resume", "{R}", "train.micro_batch=4"]),
    ("refused", ["resume", "{R}", "train.resume=never"]),
    ("refused", ["resume", "{R}", "parallel=ddp"]),
    ("refused", ["resume", "{R}", "train.max_steps=0"]),
    ("refused", ["resume", "{R}", "train.max_stesp=3"]),
    ("refused", ["resume", "{R}/checkpoints"]),
    ("refused", ["export", "{R}", "{R}"]),
    ("refused", ["export", "{R}", "{R}/model"]),
    ("reads", ["export", "{R}", "{T}/exported"]),
    ("reads", ["diff", "{R}", "{R}"]),
    ("reads", ["generate", "{R}", "hi", "generate.max_new_tokens=2", "hardware=cpu"]),
    ("reads", ["replay", "{R}", "hydra.run.dir={T}/replayed"]),
    ("resumes", [*JOB, "hydra.run.dir={R}"]),
    ("resumes", ["resume", "{R}", "train.max_steps=3"]),
    ("resumes", ["resume", "{R}", "train.max_steps=4", "train.lr=0.0005"]),
]


def history(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("metrics.jsonl", ".hydra/config.yaml", "resumes.jsonl")
            if (run / name).is_file()}


def test_commands_aimed_at_a_finished_run_leave_it_whole_or_only_add_to_its_history(finished, tmp_path):
    """Issue #28's property: for a finished run folder R and every command above, R is byte-identical afterwards
    unless the command legitimately resumed it, and then its history (metrics rows, snapshot, resumes.jsonl) only
    grew."""
    run = copy_of(finished, tmp_path / "R")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    values = {"R": run, "T": scratch, "parent": run.parent, "name": run.name}
    assert len(AIMED) >= 30
    for kind, arguments in AIMED:
        args = [a.format(**values) for a in arguments]
        before, old = tree_hash(run), history(run)
        proc = dsrun(*args, env={"RUNX": str(run)}, cwd=scratch, timeout=300)
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        if kind == "refused":
            assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
        else:
            assert proc.returncode == 0, (args, proc.stderr[-2000:])
        if kind in ("refused", "reads"):
            assert tree_hash(run) == before, args
            continue
        new = history(run)
        assert new[".hydra/config.yaml"] == old[".hydra/config.yaml"], args
        for name in ("metrics.jsonl", "resumes.jsonl"):
            assert new[name].startswith(old.get(name, b"")), (args, name)
        assert len(new["resumes.jsonl"]) > len(old.get("resumes.jsonl", b"")), args


def test_metrics_rows_a_resume_replaces_are_set_aside_not_dropped(finished, tmp_path):
    """Rows after the checkpoint a resume starts from (replayed) and half a line a kill left were dropped silently."""
    run = copy_of(finished, tmp_path / "R")
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    proc = dsrun("resume", str(run), "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 line(s) of metrics.jsonl" in proc.stderr and "metrics.set_aside.jsonl" in proc.stderr
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3]
    assert (run / "metrics.set_aside.jsonl").read_text() == json.dumps({"step": 5, "loss": 1.0}) + '\n{"step": 6, "lo\n'


@pytest.mark.parametrize("verb", ["export", "generate"])
def test_a_run_being_written_is_not_read_by_export_or_generate(finished, tmp_path, verb):
    run = copy_of(finished, tmp_path / "R")
    holder = hold_lock(run)
    try:
        args = [str(run), str(tmp_path / "out")] if verb == "export" else [str(run), "hi", "hardware=cpu"]
        proc = dsrun(verb, *args)
        assert_user_error(proc, f"{run} is being written by pid 4242 on elsewhere", "wait for that run to end")
        assert not (tmp_path / "out").exists()
    finally:
        os.ftruncate(holder, 0)
        os.close(holder)


def test_another_ranks_job_log_is_not_a_foreign_file(tmp_path):
    """A second node's rank writes dsrun_rank1.log into a shared run folder, sometimes before rank 0 claims it: the
    two-node doctor run was refused as foreign (flaky). Any other file still is."""
    from dsrun.errors import UserError
    from dsrun.run.folder import refuse_foreign

    (tmp_path / "dsrun_rank1.log").write_text("")
    refuse_foreign(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UserError, match="notes.txt"):
        refuse_foreign(tmp_path)
