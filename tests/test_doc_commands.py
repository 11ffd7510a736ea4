"""Every `dsrun` command in README.md and docs/*.md runs, so the documentation cannot drift from the code.

Which lines are commands, and how a doc marks what cannot run here (the convention; keep docs readable):
- A command is a line of a ```bash / ```sh / ```shell block that starts with `dsrun `, `python -m dsrun` or
  `.venv/bin/python -m dsrun` (a trailing `\\` joins the next line; a trailing `# comment` is prose).
- An *error example* is a `$ `-prefixed command in a ```text / ```console block; the `dsrun: error:` lines under
  it are its expected output: it must exit 2 and print exactly those lines.
- Placeholders are filled with real things the test makes once: `outputs/runs/<time>`, `RUN_DIR`, `RUN_A`,
  `RUN_B` and `outputs/runs/<a time stamp>` with a 2-step run (checkpoint included); `outputs/sweeps/<time>` with a
  2-trial sweep (its trial `/3` becomes `/1`); `exported/` with a new folder; `prompts.txt` and `prefs.jsonl` with a file; `$PWD` with
  the working folder; `[overrides]` is dropped.
- Commands that cannot run on a CPU test box are skipped with the reason, recognised from the command itself:
  a GPU hardware option or recipe (unless the task only plans or composes: `task=plan`, `task=dry_run`, `--cfg`),
  a real-size model that would be built (any task but plan/dry_run), weights under `/models/` (a placeholder for
  your download), SLURM, `serve` (runs until stopped: tests/test_serve.py), and `generate` without a prompt
  (interactive).
- Runs are shortened, never changed in meaning: `train.max_steps=2` (6 for the smoke checks; `data.num_samples=60`
  where the command trains by epochs), `train.seq_len=32`, `data.num_samples=32`, no checkpoints,
  `monitor.prometheus.port=0`; `generate.max_new_tokens=8`; `task.max_completion_tokens=8` under `task=grpo`.
All run in one temporary working folder through the fork server (tests/forkserver.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, THIRD_PARTY, dsrun

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = (".venv/bin/python -m dsrun", "python -m dsrun", "dsrun ")
COMMAND_FENCES = ("bash", "sh", "shell")
OUTPUT_FENCES = ("text", "console")
PLANS_ONLY = ("task=plan", "task=dry_run", "--cfg")
REAL_MODELS = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if not p.stem.startswith("tiny")}
GPU_HARDWARE = {p.stem for p in (REPO / "conf" / "hardware").glob("*.yaml")
                if (yaml.safe_load(p.read_text()) or {}).get("accelerator") == "cuda"}
SHORT = ["train.seq_len=32", "data.num_samples=32", "train.checkpoint_every=-1", "monitor.prometheus.port=0"]


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, expected error lines) for every command of every doc."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        fence, i = None, 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
                i += 1
                continue
            where = f"{doc.relative_to(REPO)}:{i + 1}"
            text = line[2:] if fence in OUTPUT_FENCES and line.startswith("$ ") else line if fence in COMMAND_FENCES \
                else ""
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            if text.startswith(PREFIXES):
                expected = []
                if fence in OUTPUT_FENCES:
                    for after in lines[i + 1:]:
                        if not after.startswith("dsrun: error:"):
                            break
                        expected.append(after)
                found.append((where, text, expected))
            i += 1
    return found


COMMANDS = doc_commands()


def why_not_here(args: list[str]) -> str | None:
    """The reason a command cannot run on a CPU test box, or None."""
    joined = " ".join(args)
    plans = any(a.startswith(PLANS_ONLY) for a in args)
    if any(a.startswith("hydra/launcher=") and "slurm" in a for a in args):
        return "needs a SLURM cluster"
    if "/models/" in joined:
        return "needs downloaded weights (/models/... is a placeholder)"
    if args and args[0] == "serve":
        return "a server runs until stopped (tests/test_serve.py runs one)"
    if args and args[0] == "generate" and len([a for a in args[1:] if "=" not in a]) < 2 \
            and "generate.prompts_file" not in joined:
        return "interactive chat"
    if plans:
        return None
    hardware = [a.split("=", 1)[1] for a in args if a.startswith("hardware=")]
    recipe = [a.split("=", 1)[1] for a in args if a.startswith("+recipe=")]
    for name in recipe:
        hardware += re.findall(r"override /hardware: (\S+)", (REPO / "conf" / "recipe" / f"{name}.yaml").read_text())
    if gpu := [h for h in hardware if h in GPU_HARDWARE]:
        return f"needs GPUs (hardware={gpu[0]})"
    if model := [a.split("=", 1)[1] for a in args if a.startswith("model=") and a.split("=", 1)[1] in REAL_MODELS]:
        if args[0] != "doctor":
            return f"builds a real-size model ({model[0]}) at random: too big for a CPU test"
    return None


def shortened(args: list[str]) -> list[str]:
    """The command with a short run's overrides (training tasks only; plans and listings are left alone)."""
    if args and args[0] == "generate":
        return [*args, "generate.max_new_tokens=8"]
    if args and args[0] in ("runs", "diff", "report", "export", "doctor", "serve"):
        return args
    if any(a.startswith(PLANS_ONLY) for a in args):
        return args
    if any(a.startswith("train.epochs=") for a in args):  # an epoch of 60 short records, an eval set of 3
        return [*args, *[a for a in SHORT if not a.startswith("data.num_samples")], "data.num_samples=60"]
    smoke = "task=smoke" in args or args[:1] == ["rollback"]  # the smoke checks need 6 steps
    rollouts = ["task.max_completion_tokens=8"] if "task=grpo" in args else []  # completions inside seq_len 32
    return [*args, *SHORT, *rollouts, f"train.max_steps={6 if smoke else 2}"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    """A run (with a checkpoint), a sweep and a run marked good for the placeholders and `dsrun rollback`, in the
    folder the commands run in."""
    root = tmp_path_factory.mktemp("docs")
    run = root / "outputs" / "runs" / "doc-run"
    proc = dsrun("hardware=cpu", "monitor=none", "train.max_steps=2", "train.log_every=1", *SHORT[:2],
                 run_dir=run, cwd=root)
    assert proc.returncode == 0, proc.stderr
    sweep = root / "outputs" / "sweeps" / "doc-sweep"
    proc = dsrun("-m", "hardware=cpu", "monitor=none", "train.max_steps=2", "train.micro_batch=1,2", *SHORT[:3],
                 f"hydra.sweep.dir={sweep}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    proc = dsrun("task=smoke", "hardware=cpu", "monitor=none", "train.max_steps=6", *SHORT[:3], cwd=root)
    assert proc.returncode == 0, proc.stderr  # a run marked good: `dsrun rollback` replays it
    (root / "prompts.txt").write_text("What is 2 + 2?\n")
    (root / "prefs.jsonl").write_text("".join(  # docs/preference.md's pairs
        f'{{"prompt": "What is {i} + {i}?", "chosen": "{2 * i}", "rejected": "I cannot answer."}}\n' for i in range(40)))
    return {"root": root, "run": run, "sweep": sweep}


def filled(command: str, places: dict[str, Path], n: int) -> list[str]:
    text = command.split(" #", 1)[0]
    for prefix in PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    text = text.replace("outputs/sweeps/<time>/3", f"{places['sweep']}/1")
    text = text.replace("outputs/sweeps/<time>", str(places["sweep"])).replace("$PWD/", "")
    text = re.sub(r"outputs/runs/(<time>|\d{4}-[\d_-]+)", str(places["run"]), text)
    for word in ("RUN_DIR", "RUN_A", "RUN_B"):
        text = re.sub(rf"\b{word}\b", str(places["run"]), text)
    text = text.replace("[overrides]", "").replace(" exported/", f" {places['root']}/exported-{n}/")
    return shlex.split(text)


def marked(command: tuple[str, str, list[str]]) -> object:
    """Sweeps start a fresh interpreter per trial (10 s each on 2 cores): `slow`, like the suite's other
    multi-process runs."""
    return pytest.param(*command, marks=[pytest.mark.slow] if " -m " in f" {command[1]} " else [])


@pytest.mark.parametrize("where,command,expected", [marked(c) for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_documented_command_runs(where, command, expected, workdir):
    args = filled(command, workdir, COMMANDS.index((where, command, expected)))
    if reason := why_not_here(args):
        pytest.skip(f"{where}: {reason}")
    proc = dsrun(*(args if expected else shortened(args)), cwd=workdir["root"], timeout=240)
    if expected:
        assert proc.returncode == 2, f"{where}: an error example exited {proc.returncode}\n{proc.stderr}"
        got = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: error:")]
        assert got == expected, f"{where}: the doc shows {expected}, dsrun prints {got}"
    else:
        assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, f"{where}: {proc.stderr[-3000:]}"
    if "-v" not in args:  # -v asks for the libraries' lines
        noisy = [ln for ln in (proc.stdout + proc.stderr).splitlines() if THIRD_PARTY.search(ln)]
        assert not noisy, f"{where}: third-party lines on the console: {noisy[:5]}"


def test_the_convention_finds_commands_and_error_examples():
    assert len(COMMANDS) > 60
    assert sum(1 for _, _, expected in COMMANDS if expected) >= 2
