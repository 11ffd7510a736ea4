"""The bad-input catalog (docs/bad-inputs.md): each case stops with one line per problem naming the key or file and
the fix, exit 2, no traceback, and nothing saved before is lost."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, assert_user_error, dsrun

ROWS = [
    # id, category, overrides (strings; {tmp} and {ckpt} are filled in), fragments the message names
    ("unknown-option", "config", ["hardware=4x409"], ["hardware=4x409", "did you mean hardware=4x4090"]),
    ("typo-key", "config", ["train.max_step=5"], ["train.max_step", "did you mean train.max_steps"]),
    ("wrong-type", "config", ["train.max_steps=many"], ["train.max_steps=many", "Integer"]),
    ("zero-micro-batch", "config", ["train.micro_batch=0"], ["train.micro_batch=0", ">= 1"]),
    ("negative-seq-len", "config", ["train.seq_len=-8"], ["train.seq_len=-8"]),
    ("zero-devices", "config", ["hardware.devices=0"], ["hardware.devices=0"]),
    ("negative-lr", "config", ["train.lr=-1"], ["train.lr=-1"]),
    ("profile-longer-than-run", "config", ["train.profile_steps=4", "train.max_steps=5"],
     ["train.profile_steps=4", "train.max_steps >= 6"]),
    ("seq-len-above-model-max", "config", ["train.seq_len=4096"], ["train.seq_len=4096", "maximum of 2048"]),
    ("deepspeed-on-cpu", "config", ["parallel=zero3"], ["DeepSpeed needs CUDA"]),
    ("fp16-on-cpu", "config", ["precision=fp16"], ["precision=fp16", "bf16"]),
    ("fp8-without-fp8-gpu", "config", ["hardware=1x3060", "precision=fp8"], ["no FP8"]),
    ("single-with-two-processes", "config", ["hardware.devices=2", "parallel=single"], ["parallel=ddp"]),
    ("quant-without-adapter", "config", ["quant=nf4"], ["adapter=lora"]),
    ("quantized-base-sharded", "config", ["quant=nf4", "adapter=lora", "parallel=fsdp"], ["parallel=ddp"]),
    ("jsonl-without-path", "config", ["data=jsonl"], ["data.path"]),
    ("unknown-gpu", "config", ["hardware.gpu=rtx9090"], ["rtx9090", "rtx4090"]),
    ("doctor-sizes-reversed", "config", ["task=doctor", "doctor.min_bytes=64", "doctor.max_bytes=4"],
     ["doctor.max_bytes=4", "doctor.min_bytes (64)"]),
    ("pretrained-without-path", "config", ["model.init=pretrained"], ["model.path"]),
    ("unknown-task", "config", ["task.name=fly"], ["task.name=fly"]),
    ("tp-not-dividing-heads", "config", ["model=tiny_qwen2", "hardware.devices=3", "parallel=tp",
                                         "parallel.tensor_parallel_size=3"], ["tensor_parallel_size=3", "4 attention"]),
    ("emulate-without-gpu", "config", ["hardware.emulate=true"], ["hardware.emulate=true", "GPU hardware option"]),
    ("eval-split-outside-0-1", "config", ["data.eval_split=1.5"], ["data.eval_split=1.5", "between 0 and 1"]),
    ("epochs-and-max-steps", "config", ["train.epochs=2"], ["train.epochs=2 with train.max_steps=2",
                                                             "train.max_steps=null"]),
    ("bad-architecture-field", "config", ["model.fields.hidden_size=abc"], ["model.fields", "hidden_size"]),
    ("missing-jsonl", "data", ["data=jsonl", "data.path={tmp}/missing.jsonl"], ["no such file"]),
    ("empty-jsonl", "data", ["data=jsonl", "data.path={tmp}/empty.jsonl"], ["empty"]),
    ("malformed-jsonl", "data", ["data=jsonl", "data.path={tmp}/malformed.jsonl"], ["malformed.jsonl:2", "JSON"]),
    ("non-utf8-line", "data", ["data=jsonl", "data.path={tmp}/latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"]),
    ("chat-missing-role", "data", ["data=jsonl", "data.path={tmp}/norole.jsonl"], ["norole.jsonl:1", "role"]),
    ("record-without-text", "data", ["data=jsonl", "data.path={tmp}/nofield.jsonl"], ["nofield.jsonl:1", "text"]),
    ("data-smaller-than-a-block", "data", ["data=jsonl", "data.path={tmp}/tiny.jsonl"],
     ["packs into 1 rows", "fewer than one global micro-batch"]),
    ("chat-without-assistant-turn", "data", ["data=jsonl", "data.path={tmp}/noassistant.jsonl"],
     ["noassistant.jsonl:1", "no assistant turn"]),
    ("eval-set-too-small", "data", ["data.eval_path={tmp}/tiny.jsonl"], ["eval set", "fewer than one batch"]),
    ("tokenizer-model-vocab-mismatch", "data", ["model=r1_distill_llama_8b"], ["outside the model's vocabulary"]),
    ("missing-model-folder", "model", ["model.init=pretrained", "model.path={tmp}/nope"], ["no such folder"]),
    ("model-folder-without-config", "model", ["model.init=pretrained", "model.path={tmp}/noconfig"],
     ["no config.json"]),
    ("pickle-weights-only", "model", ["model.init=pretrained", "model.path={tmp}/binonly"], ["no *.safetensors"]),
    ("remote-code-not-allowed", "model", ["model.init=pretrained", "model.path={tmp}/remote"],
     ["trust_remote_code=true"]),
    ("source-not-a-model-folder", "model", ["task=generate", "task.source={tmp}", "generate.prompt=hi"],
     ["not a run folder", "dsrun export"]),
    ("prompt-longer-than-context", "model", ["task=generate", "model=tiny_qwen2",
                                             "model.fields.max_position_embeddings=32", "generate.prompt=hi"],
     ["exceeds the model's context of 32", "generate.max_new_tokens"]),
    ("checkpoint-of-another-model", "checkpoint", ["model=tiny_qwen2", "train.resume={ckpt}"],
     ["cannot load it", "train.resume=never"]),
    ("truncated-checkpoint", "checkpoint", ["train.resume={tmp}/truncated"], ["cannot load it"]),
    ("resume-from-non-checkpoint", "checkpoint", ["train.resume={tmp}"], ["not a complete dsrun checkpoint"]),
    ("more-gpus-than-present", "environment", ["hardware=4x4090", "precision=bf16"], ["asks for 4 GPUs", "task=plan"]),
    ("vllm-not-installed", "environment", ["task=serve", "serve.engine=vllm"], ["no `vllm` executable", "pip install"]),
    ("unwritable-run-folder", "environment", ["hydra.run.dir={tmp}/a-file/run"], ["cannot create the run folder"]),
]

FILES = {
    "empty.jsonl": b"\n\n",
    "malformed.jsonl": b'{"text": "ok"}\n{"text": "broken"\n',
    "latin1.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
    "norole.jsonl": b'{"messages": [{"content": "hi"}]}\n',
    "nofield.jsonl": b'{"prompt": "hi"}\n',
    "tiny.jsonl": b'{"text": "hi"}\n',
    "noassistant.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n'
                         b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "?"}]}\n',
    "a-file": b"",
    "noconfig/README": b"",
    "binonly/config.json": json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "intermediate_size": 128, "vocab_size": 129280}).encode(),
    "binonly/pytorch_model.bin": b"not unpickled",
    "remote/config.json": json.dumps({"model_type": "custom_thing",
                                      "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}).encode(),
}


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    proc = dsrun(*FAST, "train.max_steps=2", "train.seq_len=64", "train.micro_batch=2", "train.checkpoint_every=0",
                 run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir / "checkpoints" / "step-00000002"


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_catalog(case, tmp_path, checkpoint):
    name, category, overrides, fragments = case
    for rel, content in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    args = [o.format(tmp=tmp_path, ckpt=checkpoint) for o in overrides]
    if name == "truncated-checkpoint":
        shutil.copytree(checkpoint, tmp_path / "truncated")
        state = tmp_path / "truncated" / "state"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    saved = fingerprint(checkpoint.parent.parent) if category == "checkpoint" else None
    run_dir = None if any(a.startswith("hydra.run.dir") for a in args) else tmp_path / "run"
    proc = dsrun(*FAST, "train.max_steps=2", *args, run_dir=run_dir, timeout=120)
    assert_user_error(proc, *fragments)
    if saved is not None:
        assert fingerprint(checkpoint.parent.parent) == saved, "nothing saved before is lost"


def test_catalog_is_documented_and_large_enough():
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    assert len(ROWS) >= 25
    for name, category, _, _ in ROWS:
        assert f"`{name}`" in doc, f"{name} missing from docs/bad-inputs.md"
    assert {r[1] for r in ROWS} == {"config", "data", "model", "checkpoint", "environment"}


def test_several_problems_are_all_reported(tmp_path):
    proc = dsrun(*FAST, "train.micro_batch=0", "train.accumulation=0", run_dir=tmp_path / "run")
    assert_user_error(proc, "train.micro_batch=0", "train.accumulation=0")
    assert len(proc.stderr.strip().splitlines()) == 2
    assert not (tmp_path / "run").exists(), "a refused run creates no run folder"


def test_sweep_over_an_unknown_key_is_refused_before_any_trial(tmp_path):
    proc = dsrun("-m", *FAST, "train.micro_batchh=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_user_error(proc, "train.micro_batchh")
    assert not (tmp_path / "sweep").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert_user_error(dsrun("resume", str(tmp_path)), "not a dsrun run folder")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: a tmpfs that holds one checkpoint of the tiny model (~200 MB with AdamW) but not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'not root'}); the disk-full case needs one")
    try:
        run_dir = mount / "run"
        proc = dsrun(*FAST, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                     "train.seq_len=64", "train.micro_batch=2", run_dir=run_dir)
        assert_user_error(proc, "No space left", "is intact")
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert (run_dir / "checkpoints" / latest / "COMPLETE").is_file()
        assert not list((run_dir / "checkpoints").glob("*.incomplete")), "the partial save is cleaned up"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
