"""`dsrun export`: a finished LoRA run (QLoRA too) becomes a plain Hugging Face folder that transformers loads as it
is, with the same logits as the merged model in memory, and a tokenizer that round-trips an R1 chat."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAST, assert_user_error, dsrun


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    proc = dsrun(*FAST, "model=tiny_qwen2", "quant=nf4", "adapter=lora", "train.max_steps=3", "train.seq_len=32",
                 "train.micro_batch=2", "train.lr=1e-2", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_export_reloads_with_transformers_and_gives_the_merged_logits(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsrun.model import merged_model

    out = tmp_path / "hf"
    proc = dsrun("export", str(qlora_run), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the saved bf16 weights, fp32 math
    merged = merged_model(qlora_run)[0].float()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float(),
                                   rtol=1e-3, atol=1e-3)
    # the adapters changed the model: the export is not the bare base
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = "<｜User｜>2+2?<｜Assistant｜><think>\n2+2=4\n</think>\n\n4"
    assert tokenizer.decode(tokenizer(chat, add_special_tokens=False)["input_ids"]) == chat
    assert (qlora_run / "model" / "tokenizer.json").is_file(), "the run's own model/ carries the tokenizer too"


def test_export_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    assert_user_error(dsrun("export", str(tmp_path), str(tmp_path / "out")), "not a run folder")


def test_task_export_writes_what_the_verb_writes(qlora_run, tmp_path):
    """task=export task.source=RUN task.out=OUT is `dsrun export RUN OUT`: the same files, the same weights, the
    folder's path on stdout."""
    from safetensors.torch import load_file

    verb, task = tmp_path / "verb", tmp_path / "task"
    assert dsrun("export", str(qlora_run), str(verb)).returncode == 0
    proc = dsrun("task=export", f"task.source={qlora_run}", f"task.out={task}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(task.resolve())
    assert {p.name for p in task.iterdir()} == {p.name for p in verb.iterdir()}
    ours, theirs = load_file(task / "model.safetensors"), load_file(verb / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
