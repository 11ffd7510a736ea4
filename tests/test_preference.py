"""task=dpo (issue 32, first part): the loss equals TRL's DPOTrainer for the same weights and batch; a run raises
the chosen-vs-rejected margin; bad preference data is one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from dsrun.data import load_tokenizer
from dsrun.loss import IGNORE_INDEX, attach_chunked_loss
from dsrun.preference import dpo_losses, sequence_logps
from tests.conftest import FAST, assert_user_error, dsrun, model_cfg, read_metrics, small_vocabulary

PAIRS = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
         {"prompt": "Capital of France?", "chosen": "Paris is the capital.", "rejected": "Rome"},
         {"prompt": "Is ice cold?", "chosen": "Yes, it is.", "rejected": "No"}]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trls(tmp_path, loss):
    trl = pytest.importorskip("trl", reason="trl is a test-only dependency (./setup.sh --dev installs it)")
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(model_cfg("tiny_qwen2"))
    torch.manual_seed(0)
    fields = OmegaConf.to_container(model_cfg("tiny_qwen2").fields)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields))
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the policy a few steps away from the reference: log-ratios that are not zero
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours, our_reference = attach_chunked_loss(copy.deepcopy(policy)), attach_chunked_loss(copy.deepcopy(reference))
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, beta=0.1, loss_type=[loss],
                         report_to=[], use_cpu=True, max_length=64, bf16=False)  # fp32 on both sides
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    ids, completion = batch["input_ids"], batch["completion_mask"]
    assert bool((batch["attention_mask"].cumsum(1) == torch.arange(1, ids.shape[1] + 1)).logical_or(
        batch["attention_mask"] == 0).all()), "right padding: positions 0..n-1 as dsrun runs them"
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    kwargs = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(our_reference, kwargs).chunk(2)
    chosen, rejected = sequence_logps(ours, kwargs).chunk(2)
    tokens = (labels != IGNORE_INDEX).sum(1).float()
    losses, _, _ = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, 0.1, loss, *tokens.chunk(2))
    mine = losses.mean()
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5 * abs(theirs.item()), (mine.item(), theirs.item())
    assert abs(theirs.item() - (0.6931 if loss == "sigmoid" else 25.0)) > 1e-3  # not the trivial value
    for (name, a), b in zip(trainer.model.named_parameters(), ours.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-9, (name, (a.grad - b.grad).norm(), a.grad.norm())


def preference_file(path, n: int = 48):
    # an answer preferred to a refusal: a preference a tiny model can learn well enough to carry to new prompts
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": "I cannot answer that."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DPO = [*FAST, *small_vocabulary(), "task=dpo", "train.seq_len=64", "train.micro_batch=4", "train.log_every=5"]


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_dpo_raises_the_margin_on_held_out_pairs(tmp_path, adapter):
    """Trained on 48 pairs, the model's log-probability margin (chosen - rejected) on 16 pairs it never saw rises
    over the same model untrained (a run of one step at a learning rate of 1e-30: its initial weights)."""
    data = preference_file(tmp_path / "train.jsonl")
    held = [json.loads(line) for line in preference_file(tmp_path / "held.jsonl", 64).read_text().splitlines()][48:]
    lr = "train.lr=3e-3" if adapter == "lora" else "train.lr=3e-4"
    common = [*DPO, f"adapter={adapter}", "data=jsonl", f"data.path={data}"]
    proc = dsrun(*common, "train.max_steps=30", lr, run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] and rows[-1]["reward_accuracy"] >= 0.75, rows
    assert rows[-1]["loss"] < rows[0]["loss"] < 0.7
    assert dsrun(*common, "train.max_steps=1", "train.lr=1e-30", run_dir=tmp_path / "untrained").returncode == 0

    from dsrun.inference.load import load
    from dsrun.preference import as_rows, preference_blocks

    def margin(run: str) -> float:
        cfg = OmegaConf.merge(OmegaConf.load(tmp_path / run / "config.yaml"), {"task": {"source": str(tmp_path / run)}})
        loaded = load(cfg)
        model = attach_chunked_loss(loaded.model)
        blocks = preference_blocks([(r, "held") for r in held], loaded.tokenizer, 64, 129280, 0)
        inputs, labels = as_rows(blocks.inputs, blocks.labels)
        with torch.no_grad():
            chosen, rejected = sequence_logps(model, {"input_ids": inputs, "labels": labels}).chunk(2)
        return float((chosen - rejected).mean())

    assert margin("run") > margin("untrained") + 0.1


@pytest.mark.parametrize("record,fragment", [
    ({"prompt": "hi", "chosen": "a"}, "needs `chosen` and `rejected`"),
    ({"prompt": "hi", "chosen": "a", "rejected": 3}, "strings or lists of messages"),
])
def test_bad_preference_data_is_one_line(tmp_path, record, fragment):
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    proc = dsrun(*DPO, "data=jsonl", f"data.path={tmp_path / 'p.jsonl'}", run_dir=tmp_path / "run")
    assert_user_error(proc, "p.jsonl:1", fragment)


@pytest.mark.parametrize("override,fragment", [("task.beta=0", "task.beta=0"), ("task.loss=kto", "task.loss=kto"),
                                               ("data=synthetic_tokens", "preference pairs come from")])
def test_bad_dpo_config_is_one_line(tmp_path, override, fragment):
    assert_user_error(dsrun(*DPO, override, run_dir=tmp_path / "run"), fragment)


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_dpo_resumes_exactly(tmp_path, adapter):
    """A run stopped after its 3rd step and resumed logs the losses and rewards of the uninterrupted run (the
    reference of a full fine-tune is recomputed from the initial weights as the resumed run starts)."""
    job = [*DPO, f"adapter={adapter}", "train.log_every=1", "train.checkpoint_every=3", "optim.schedule=constant",
           "optim.warmup_steps=0", "data.num_samples=32"]
    assert dsrun(*job, "train.max_steps=6", run_dir=tmp_path / "full").returncode == 0
    assert dsrun(*job, "train.max_steps=3", run_dir=tmp_path / "cut").returncode == 0
    resumed = dsrun("resume", str(tmp_path / "cut"), "train.max_steps=6")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    keys = ("loss", "reward_margin", "rewards_chosen", "reward_accuracy")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "cut")] == \
        [[r[k] for k in keys] for r in read_metrics(tmp_path / "full")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_processes_matches_one(tmp_path, strategy):
    job = [*DPO, "adapter=lora", "train.log_every=1", "train.max_steps=4", "data.num_samples=32"]
    one = dsrun(*job, run_dir=tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = dsrun(*job, "hardware.devices=2", f"parallel={strategy}", "train.micro_batch=2", run_dir=tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    # the margin is beta times a difference of sequence log-probabilities in the hundreds: float32 sums in another
    # order (two ranks, another thread count) move it by ~1e-6 absolute, 1e-4 of a margin as small as 0.007
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["reward_margin"] == pytest.approx(
            a["reward_margin"], rel=1e-4, abs=5e-6)


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_dpo_eval_set_scores_held_out_pairs_and_keeps_the_best(tmp_path, adapter):
    data = preference_file(tmp_path / "train.jsonl", 64)
    lr = "train.lr=3e-3" if adapter == "lora" else "train.lr=3e-4"
    proc = dsrun(*DPO, f"adapter={adapter}", "data=jsonl", f"data.path={data}", "data.eval_split=0.25", lr,
                 "train.max_steps=12", "train.eval_every=6", "train.keep_best=true", "train.checkpoint_every=0",
                 run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval set: 16 pairs" in proc.stderr
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval_loss"] < 0.69 and evals[-1]["eval_reward_accuracy"] > 0.5, evals
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_eval_step"] in (6, 12) and summary["eval_ppl"] is None
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()
