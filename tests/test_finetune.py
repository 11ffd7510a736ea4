"""Fine-tuning done right: R1's chat template with the trained turn's reasoning kept, loss on the assistant's tokens
only, packed documents that do not see each other, eval loss under every strategy, keep_best, epochs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dsrun.chat import Document, r1_template, render, tokenize
from dsrun.loss import IGNORE_INDEX
from dsrun.packing import pack
from tests.conftest import FAST, REPO, dsrun, read_metrics, small_vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    from omegaconf import OmegaConf

    from dsrun.families import ModelConfig
    from dsrun.data import load_tokenizer

    return load_tokenizer(OmegaConf.structured(ModelConfig(name="tiny", arch="deepseek_v3")))


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "<think>\n5 x 4 = 20.\n</think>\n\n20."},
]


def test_multi_turn_r1_chat_renders_as_deepseeks_template_with_the_trained_turns_reasoning_kept(tokenizer, tmp_path):
    eos = tokenizer.eos_token
    docs = render({"messages": CHAT}, "chat.jsonl:1", tokenizer, "assistant")
    assert len(docs) == 2, "one document per assistant turn, each with its own history"
    for doc, turn in zip(docs, (2, 4)):
        reference = tokenizer.apply_chat_template(CHAT[: turn + 1], tokenize=False)  # transformers + R1's template
        full, stripped = CHAT[turn]["content"], CHAT[turn]["content"].split("</think>")[-1]
        assert reference.endswith("<｜Assistant｜>" + stripped + eos)
        assert doc.text == reference[: -len(stripped + eos)] + full + eos  # only the trained turn differs
        [tokens] = tokenize([doc], tokenizer)
        assert tokens.ids == tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        trained = [t for t, keep in zip(tokens.ids, tokens.trained) if keep]
        assert tokenizer.decode(trained) == full + eos, "labels: the whole reply with <think>, and the end of turn"
    assert "Two plus three" not in docs[1].text, "earlier turns follow the template: reasoning dropped"
    # the tokenizer carries the template into every saved model folder (transformers: chat_template.jinja)
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == r1_template()


def test_train_on_all_and_text_records_train_on_every_token(tokenizer):
    [chat] = tokenize(render({"messages": CHAT}, "x", tokenizer, "all"), tokenizer)
    assert all(chat.trained) and tokenizer.decode(chat.ids).count("<think>") == 2
    [text] = tokenize(render({"text": "plain words"}, "x", tokenizer, "assistant"), tokenizer)
    assert all(text.trained) and text.ids[0] == tokenizer.bos_token_id and text.ids[-1] == tokenizer.eos_token_id
    assert render({"messages": CHAT[:2]}, "x", tokenizer, "assistant") == [], "no assistant turn: nothing to train"


def test_long_documents_split_and_rows_pad_with_masked_labels():
    long, short = Document(list(range(1, 301)), [True] * 300), Document([7, 8, 9], [False, True, True])
    blocks = pack([long, short], seq_len=128, pad_id=0)
    assert blocks.stats["split"] == 1 and blocks.trained_tokens == 299 + 2, "every target kept"
    assert blocks.positions is not None and blocks.stats["rows"] == 3
    padded = pack([long, short], seq_len=128, pad_id=0, packing=False)
    assert len(padded) == 4 and padded.positions is None and padded.trained_tokens == 301
    assert (padded.labels[-1, 2:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("model", ["tiny", "tiny_qwen2"])
def test_a_packed_document_does_not_see_the_one_before_it(model):
    """Eager and SDPA attention (compiled flex attention on CPU, torch 2.13, gave wrong values at
    length 8 once)."""
    from hydra import compose, initialize_config_dir

    from dsrun.schema import register_configs
    from dsrun.loss import attach_chunked_loss
    from dsrun.model import architecture, build_model

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hardware=cpu", f"model={model}"])
    g = torch.Generator().manual_seed(0)
    first, second, changed = (torch.randint(1, 1000, (n,), generator=g).tolist() for n in (11, 8, 11))
    rows = [pack([Document(ids, [True] * len(ids)) for ids in (doc1, second)], seq_len=17, pad_id=0)
            for doc1 in (first, changed)]
    assert [len(r) for r in rows] == [1, 1], "both documents share one row"
    start = 10  # the first document's 10 inputs come first: best fit places the longer one first
    assert rows[0].positions[0, start] == 0 and rows[0].positions[0, start:].tolist() == list(range(7))
    for impl in ("eager", "sdpa"):
        arch = architecture(cfg.model)
        arch._attn_implementation = impl
        net = build_model(cfg.model, arch, seed=0).eval()
        with torch.no_grad():
            logits = [net(input_ids=r.inputs, position_ids=r.positions).logits[0, start:] for r in rows]
            unmasked = net(input_ids=rows[1].inputs).logits[0, start:]
        assert (logits[0] - logits[1]).abs().max() < 1e-5, impl
        assert (unmasked - logits[1]).abs().max() > 1e-3, "without position ids the documents do see each other"
        attach_chunked_loss(net)  # the training forward passes the position ids through
        second_only = [r.labels.clone() for r in rows]
        for labels in second_only:
            labels[0, :start] = IGNORE_INDEX
        with torch.no_grad():
            losses = [net(input_ids=r.inputs, labels=y, position_ids=r.positions)[0] for r, y in zip(rows, second_only)]
        assert abs(losses[0] - losses[1]) < 1e-4, impl


def test_document_bounds_start_at_every_zero_position_and_every_row():
    from dsrun.attention import document_bounds

    positions = torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])  # the second row continues a split document
    offsets = document_bounds(positions)
    assert offsets.tolist() == [0, 3, 5, 7, 10] and offsets.dtype == torch.int32


def _packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2],
                              [3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1, 2]])
    ids = torch.randint(1, 1000, positions.shape, generator=g)
    return ids, positions


@pytest.mark.parametrize("model", ["tiny", "tiny_qwen2"])
def test_varlen_attention_trains_exactly_as_transformers_packed_mask(model):
    """dsrun's attention over packed documents (bounds from the host, no mask built by transformers) gives the
    loss and every gradient of transformers' own packed-sequence SDPA mask, for MLA (tiny) and GQA (tiny_qwen2);
    without the bounds the documents would see each other. On CPU it runs SDPA with the block-diagonal mask; the
    CUDA kernel is checked against the same reference by tests/test_gpu.py."""
    from hydra import compose, initialize_config_dir

    from dsrun.attention import batch_kwargs, use_varlen_attention
    from dsrun.schema import register_configs
    from dsrun.loss import attach_chunked_loss
    from dsrun.model import architecture, build_model

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hardware=cpu", f"model={model}"])
    ids, positions = _packed_batch()
    nets = [attach_chunked_loss(build_model(cfg.model, architecture(cfg.model), seed=0)) for _ in range(2)]
    use_varlen_attention(nets[1])
    reference, _ = nets[0](input_ids=ids, labels=ids, position_ids=positions)
    ours, _ = nets[1](input_ids=ids, labels=ids, **batch_kwargs(positions, torch.device("cpu")))
    unmasked, _ = nets[0](input_ids=ids, labels=ids)
    assert abs(float(unmasked) - float(reference)) > 1e-2, "the documents must matter"
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    reference.backward()
    ours.backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_varlen_kernel_gets_one_16_bit_dtype_under_autocast(monkeypatch):
    """Mixed precision (fp32 weights, bf16 autocast): the rotary embedding returns fp32 queries and keys beside a
    bf16 value, and the flash kernel takes 16-bit inputs only. It must get all three in the autocast dtype, or every
    layer silently falls back to SDPA with a mask (what the H200 packing bench ran until this test)."""
    from hydra import compose, initialize_config_dir

    from dsrun import attention
    from dsrun.schema import register_configs
    from dsrun.loss import attach_chunked_loss
    from dsrun.model import architecture, build_model

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hardware=cpu", "model=tiny_qwen2"])
    ids, positions = _packed_batch()
    net = attach_chunked_loss(build_model(cfg.model, architecture(cfg.model), seed=0))
    attention.use_varlen_attention(net)
    seen = []
    monkeypatch.setattr(attention, "_flash", lambda q, k, v, *rest: seen.append({q.dtype, k.dtype, v.dtype}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(input_ids=ids, labels=ids, **attention.batch_kwargs(positions, torch.device("cpu")))
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen), seen


def chats(path: Path, n: int = 200) -> Path:
    """Random user turns, one fixed reply: only the reply can be learned."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(n):
            user = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(rng.randint(20, 60)))
            reply = {"role": "assistant", "content": "The answer is forty-two."}
            handle.write(json.dumps({"messages": [{"role": "user", "content": user}, reply]}) + "\n")
    return path


LEARN = [*FAST, "data=jsonl", "train.seq_len=64", "train.max_steps=25", "train.lr=1e-2", "optim.warmup_steps=3"]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_loss_on_the_assistant_turns_learns_the_reply_and_all_tokens_cannot(train_on, tmp_path):
    proc = dsrun(*LEARN, f"data.path={chats(tmp_path / 'chats.jsonl')}", f"data.train_on={train_on}",
                 run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    if train_on == "assistant":
        assert min(r["loss"] for r in rows) < 0.5, [r["loss"] for r in rows]
        assert rows[-1]["tokens_trained"] < 0.4 * rows[-1]["tokens_seen"]
    else:
        assert min(r["loss"] for r in rows) > 2, [r["loss"] for r in rows]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"tokens_trained", "trained_tokens_per_s", "tokens_seen", "tokens_per_s"} <= summary.keys()


EVAL = [*FAST, *small_vocabulary(), "model=tiny_qwen2", "optim=sgd", "train.lr=0.05", "train.seq_len=64",
        "data.num_samples=200", "data.eval_split=0.1", "train.max_steps=2", "train.eval_every=1", "optim.warmup_steps=0"]
LAYOUTS = {
    "single": ["train.micro_batch=4", "train.keep_best=true"],
    "ddp": ["parallel=ddp", "hardware.devices=2", "train.micro_batch=2"],
    "fsdp": ["parallel=fsdp", "hardware.devices=2", "train.micro_batch=2"],
}


def test_eval_loss_is_the_same_under_every_strategy_and_keep_best_keeps_its_step(tmp_path):
    procs = {name: dsrun(*EVAL, *extra, run_dir=tmp_path / name) for name, extra in LAYOUTS.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    evals = {name: [r for r in read_metrics(tmp_path / name) if "eval_loss" in r] for name in LAYOUTS}
    assert [r["step"] for r in evals["single"]] == [1, 2]
    for name in ("ddp", "fsdp"):
        for ref, row in zip(evals["single"], evals[name], strict=True):
            assert row["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), name
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
    best = min(evals["single"], key=lambda r: r["eval_loss"])["step"]
    assert (tmp_path / "single/checkpoints/best/COMPLETE").read_text().strip() == str(best)
    summary = json.loads((tmp_path / "single/summary.json").read_text())
    assert summary["best_eval_step"] == best and summary["eval_loss"] == evals["single"][-1]["eval_loss"]


def test_two_epochs_take_exactly_the_steps_two_epochs_need(tmp_path):
    # 10 rows, global batch 2 x 2 accumulation = 4 rows a step: 2 steps an epoch (2 rows left over each epoch)
    proc = dsrun(*FAST, "data=synthetic_tokens", "data.num_samples=10", "train.seq_len=16", "train.micro_batch=2",
                 "train.accumulation=2", "train.epochs=2", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["max_steps"], summary["epochs"], summary["steps_per_epoch"]) == (4, 2.0, 2)
    assert summary["tokens_per_epoch"] == 2 * 4 * 16


def test_chats_without_an_assistant_turn_are_skipped_with_a_count(tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from dsrun.sources import DataConfig
    from dsrun.data import build_datasets

    path = chats(tmp_path / "mixed.jsonl", n=4)
    with path.open("a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    cfg = OmegaConf.structured(DataConfig(source="jsonl", path=str(path)))
    train, _, line = build_datasets(cfg, tokenizer, 64, 129280)
    assert f"1 chats without an assistant turn skipped (first: {path}:5)" in line
    assert train.stats["documents"] == 4


def test_resume_restores_the_eval_history_and_the_best_checkpoint_stays_the_best(tmp_path):
    """A run stopped at step 2 and resumed to 4 reports the best eval over all 4 steps; `best` keeps its step
    unless a later eval beats it."""
    run_dir = tmp_path / "run"
    first = dsrun(*EVAL, *LAYOUTS["single"], "train.checkpoint_every=1", run_dir=run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = dsrun("resume", str(run_dir), "train.max_steps=4", "train.lr=5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    best = min(evals, key=lambda r: r["eval_loss"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_eval_step"] == best["step"] and summary["best_eval_loss"] == best["eval_loss"]
    assert (run_dir / "checkpoints/best/COMPLETE").read_text().strip() == str(best["step"])


def test_pretrained_weights_load_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 swaps in Hugging Face Hub kernels by default when loading weights, and raised "Kernels are
    not available" on a GPU image without the `kernels` package (the 1.5B GRPO benchmark stopped there): dsrun loads
    with its own layers, offline, whether or not `kernels` is installed."""
    import transformers.modeling_utils

    from dsrun.model import architecture, build_model
    from tests.conftest import model_cfg

    cfg = model_cfg("tiny_qwen2")
    model = build_model(cfg, architecture(cfg), seed=0)
    model.save_pretrained(tmp_path / "weights")
    monkeypatch.setattr(transformers.modeling_utils, "is_kernels_available", lambda: False)
    cfg.init, cfg.path = "pretrained", str(tmp_path / "weights")
    loaded = build_model(cfg, architecture(cfg), seed=1)
    assert not loaded.use_kernels
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
