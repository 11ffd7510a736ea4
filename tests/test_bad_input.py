"""Bad input stops before any work: one line per problem, exit 2, no traceback, the key and the fix named."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, assert_user_error, dsrun

CASES = [
    # (id, overrides, fragments the message must contain)
    ("unknown option", ["hardware=4x409"], ["hardware", "4x409"]),
    ("typo'd key", ["train.max_step=5"], ["train.max_step"]),
    ("wrong type", ["train.max_steps=many"], ["train.max_steps", "many"]),
    ("zero size", ["train.micro_batch=0"], ["train.micro_batch=0", ">= 1"]),
    ("negative size", ["train.seq_len=-8"], ["train.seq_len=-8"]),
    ("zero devices", ["hardware.devices=0"], ["hardware.devices=0"]),
    ("negative lr", ["train.lr=-1"], ["train.lr=-1"]),
    ("seq_len above the model's maximum", ["train.seq_len=4096"], ["train.seq_len=4096", "maximum of 2048"]),
    ("deepspeed on cpu", ["parallel=zero3"], ["DeepSpeed needs CUDA"]),
    ("fp16 on cpu", ["precision=fp16"], ["precision=fp16", "bf16"]),
    ("fp8 on a gpu without fp8", ["hardware=1x3060", "precision=fp8"], ["no FP8"]),
    ("single with two processes", ["hardware.devices=2"], ["parallel=ddp"]),
    ("quantized without adapter", ["quant=nf4"], ["adapter=lora"]),
    ("jsonl without a path", ["data=jsonl"], ["data.path"]),
    ("unknown gpu in catalog", ["hardware.gpu=rtx9090"], ["rtx9090", "rtx4090"]),
    ("pretrained without a path", ["model.init=pretrained"], ["model.path"]),
    ("unknown task", ["task.name=fly"], ["task.name=fly"]),
    ("tp heads not divisible", ["hardware.devices=3", "parallel=tp", "parallel.tensor_parallel_size=3"],
     ["tensor_parallel_size=3", "4 attention heads"]),
]


@pytest.mark.parametrize("overrides,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_exit_2(overrides, fragments, tmp_path):
    proc = dsrun(*FAST, *overrides, run_dir=tmp_path / "run", timeout=60)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists(), "a refused run must not create its run folder"


def test_several_problems_are_all_reported(tmp_path):
    proc = dsrun(*FAST, "train.micro_batch=0", "train.accumulation=0", run_dir=tmp_path / "run")
    assert_user_error(proc, "train.micro_batch=0", "train.accumulation=0")
    assert len(proc.stderr.strip().splitlines()) == 2


def test_sweep_over_an_unknown_key_is_refused_before_any_trial(tmp_path):
    proc = dsrun(*FAST, "-m", "train.micro_batchh=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_user_error(proc, "train.micro_batchh")
    assert not (tmp_path / "sweep").exists()


def test_more_gpus_than_present_is_refused(tmp_path):
    proc = dsrun("hardware=4x4090", "precision=bf16", "monitor=none", run_dir=tmp_path / "run")
    assert_user_error(proc, "asks for 4 GPUs", "task=plan")


@pytest.mark.parametrize("name,content,fragments", [
    ("missing.jsonl", None, ["no such file"]),
    ("empty.jsonl", b"\n\n", ["empty"]),
    ("malformed.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', ["malformed.jsonl:2", "malformed JSON"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["latin1.jsonl:2", "UTF-8"]),
    ("norole.jsonl", b'{"messages": [{"content": "hi"}]}\n', ["norole.jsonl:1", "role"]),
    ("nofield.jsonl", b'{"prompt": "hi"}\n', ["nofield.jsonl:1", "text"]),
    ("tiny.jsonl", b'{"text": "hi"}\n', ["do not fill one block"]),
])
def test_bad_dataset_is_one_line_naming_file_and_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    proc = dsrun(*FAST, "data=jsonl", f"data.path={path}", "train.max_steps=2", run_dir=tmp_path / "run")
    assert_user_error(proc, *fragments)


def test_missing_model_folder_is_one_line(tmp_path):
    proc = dsrun(*FAST, "model.init=pretrained", f"model.path={tmp_path / 'nope'}", "model.tokenizer=deepseek",
                 run_dir=tmp_path / "run")
    assert_user_error(proc, "no such folder")
