"""Shared test helpers: run dsrun for real, as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite's workers share the machine's cores (pyproject: 2 workers for 2): one thread per process, set before
    # torch loads here or in the runs forked from here, or every op of every worker oversubscribes them
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests import forkserver  # noqa: E402 - after the thread count

REPO = Path(__file__).resolve().parent.parent
# pytest imports this file as `conftest` and the test modules import `tests.conftest`: one module object, not two, so
# the scratch folders made through either are the ones pytest_sessionfinish removes
sys.modules.setdefault("tests.conftest", sys.modules[__name__])
# every run appends to the run ledger: keep the tests' rows out of the repository's outputs/ledger.sqlite
SCRATCH: list[str] = []  # the folders made here, removed when the session ends


def scratch(prefix: str) -> str:
    SCRATCH.append(tempfile.mkdtemp(prefix=prefix))
    return SCRATCH[-1]


if "DSRUN_LEDGER" not in os.environ:
    os.environ["DSRUN_LEDGER"] = str(Path(scratch("dsrun-ledger-")) / "ledger.sqlite")
# and plan with the catalog's links, not a bandwidth `dsrun doctor` once saved for this machine (docs/doctor.md)
if "DSRUN_DOCTOR_DIR" not in os.environ:
    os.environ["DSRUN_DOCTOR_DIR"] = scratch("dsrun-doctor-")
# Short CPU runs of the tiny model: enough steps to see learning, few enough for a 2-core CI box. No checkpoints
# unless a test asks for them (a later override wins): the 200 MB write + fsync is a third of a short run. 256
# generated samples, not 4,000: rendering those through the chat template was ~1.7 s of every run's start-up, and a
# short run reads a few dozen (epochs wrap, so a longer one sees the same samples again).
FAST = ["hardware=cpu", "monitor=none", "train.log_every=1", "train.checkpoint_every=-1", "data.num_samples=256"]


def small_vocabulary(size: int = 1024) -> list[str]:
    """Overrides for a run whose subject is not DeepSeek's tokenizer: a byte-level BPE of `size` tokens trained here
    on the built-in reasoning texts, with R1's special tokens and chat template, saved as a tokenizer folder
    (`model.tokenizer=<folder>`, the real loading path) and the model's vocabulary cut to it. The 129k-token head is
    most of a tiny model's step on a CPU: 100 SFT steps of the GRPO reward test take 7 s with it instead of ~60.
    Trained once per worker; its folder travels in DSRUN_TEST_TOKENIZER because the runs started from here import
    test modules too (a reward named by its dotted path), whose run lists would otherwise train it again each time."""
    folder = Path(os.environ.get("DSRUN_TEST_TOKENIZER") or scratch("dsrun-tokenizer-")) / str(size)
    if not (folder / "tokenizer.json").exists():
        os.environ["DSRUN_TEST_TOKENIZER"] = str(folder.parent)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from dsrun.chat import r1_template
        from dsrun.sources import reasoning_samples

        special = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                   "</think>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator((m["content"] for r in reasoning_samples(3000, 0) for m in r["messages"]),
                                trainers.BpeTrainer(vocab_size=size, special_tokens=special, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special[0], eos_token=special[1],
                                            pad_token=special[1])
        tokenizer.chat_template = r1_template()
        tokenizer.save_pretrained(folder)
    return [f"model.tokenizer={folder}", f"model.fields.vocab_size={size}"]


# what a library prints on its own (the console shows dsrun's lines only; `-v` shows these)
THIRD_PARTY = re.compile(r"Warning|WARNING|warn\(|real_accelerator|Writing model shards|INFO:|distributed_backend|"
                         r"Automatic Mixed Precision|rank_pattern|is_gradient_checkpointing|kernels-community")


def dsrun(*args: str, run_dir: Path | None = None, timeout: float = 300, env: dict | None = None,
          cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m dsrun args...` with the run folder pinned (hydra.run.dir) so tests find it. Forked from a zygote
    that has dsrun's imports loaded (tests/forkserver.py); `fresh` starts a new interpreter, as a user does."""
    argv = [*args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    server = None if fresh or forkserver.needs_fresh(env or {}) else forkserver.zygote(REPO)
    if server is not None:
        return server.run(argv, full_env, cwd or REPO, timeout)
    return subprocess.run([sys.executable, "-m", "dsrun", *argv], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)


def start(*args: str, env: dict | None = None) -> Any:
    """`python -m dsrun args...` running in the background (stdout discarded): a Popen, or its forked equivalent."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    server = None if forkserver.needs_fresh(env or {}) else forkserver.zygote(REPO)
    if server is not None:
        return server.start(list(args), full_env, REPO, stdout=False)
    return subprocess.Popen([sys.executable, "-m", "dsrun", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def pytest_sessionfinish(session, exitstatus):
    forkserver.shutdown()
    for folder in SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit 2, 'dsrun: error:' lines (other stderr lines only dsrun's own progress notes), no
    traceback, and the message names what to fix."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(ln.startswith("dsrun: error:") for ln in lines), proc.stderr
    assert all(ln.startswith("dsrun: ") for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in {proc.stderr!r}"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def model_cfg(name: str):
    """A model option as the run composes it (schema defaults under the option's file)."""
    from omegaconf import OmegaConf

    from dsrun.families import ModelConfig

    return OmegaConf.merge(OmegaConf.structured(ModelConfig),
                           OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"), {"experts_implementation": "eager"})
