"""Preference fine-tuning (`task=dpo`): pairs of replies to one prompt, the model taught to prefer the chosen one.

Data: JSONL records with `prompt`, `chosen` and `rejected` — strings, or TRL's conversational form (`prompt` a list
of messages, `chosen` / `rejected` lists of assistant messages), or `chosen` / `rejected` whole chats (the prompt
implicit in them). With `data=reasoning` the built-in arithmetic chats become pairs: the reply as generated is
chosen, the same reply with its final number off by one rejected (the reasoning identical, the answer wrong).
Each reply is rendered by the chat template and trained on its own tokens only (the assistant turn).

Loss (`task.loss`, TRL's DPOTrainer formulas): `sigmoid` is DPO, -log σ(β·((log π(c) − log π_ref(c)) −
(log π(r) − log π_ref(r)))); `ipo` is IPO, (Δ/len − 1/(2β))² with the log-ratios averaged over each reply's
tokens. The reference π_ref: under `adapter=lora` the same model with its adapters switched off (no second copy);
otherwise the model's log-probabilities before the first step, computed once as the run starts (from its initial
weights, so a resumed run computes the same ones). Log-probabilities go through the chunked head
(dsrun/loss.py): a 152k-vocabulary logits tensor is never held whole.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dsrun.chat import check_vocabulary, render, tokenize
from dsrun.errors import DataError
from dsrun.evaluate import Evaluator
from dsrun.model_inputs import model_inputs
from dsrun.packing import IGNORE_INDEX, Blocks

if TYPE_CHECKING:
    from dsrun.sources import DataConfig

def as_pair(record: Any, where: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The chosen and the rejected chat of one preference record."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: a preference record needs `chosen` and `rejected` (and `prompt` unless they are "
                        f"whole chats); found: {found}")
    prompt = record.get("prompt")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt or []

    def chat(reply: Any) -> list[dict[str, str]]:
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        if not isinstance(reply, list) or not isinstance(prompt, list):
            raise DataError(f"{where}: `prompt`, `chosen` and `rejected` are strings or lists of messages")
        return [*prompt, *reply]

    return chat(record["chosen"]), chat(record["rejected"])


def reasoning_pair(record: dict[str, Any]) -> dict[str, Any]:
    """A built-in reasoning chat as a pair: its reply chosen; rejected, the same reply with the last number of its
    answer off by one."""
    *prompt, reply = record["messages"]
    thinking, _, answer = reply["content"].rpartition("</think>")
    numbers = list(re.finditer(r"\d+", answer))
    wrong = answer
    if numbers:
        last = numbers[-1]
        wrong = answer[:last.start()] + str(int(last.group()) + 1) + answer[last.end():]
    return {"prompt": prompt, "chosen": [reply],
            "rejected": [dict(reply, content=f"{thinking}</think>{wrong}" if thinking else wrong)]}


def preference_blocks(records: list[tuple[Any, str]], tokenizer: Any, seq_len: int, vocab_size: int,
                      pad: int) -> Blocks:
    """Rows [pairs, 2, seq_len] (chosen, rejected): each reply's tokens labelled, the prompt and padding not. A
    pair whose reply is cut away entirely by train.seq_len is dropped (counted in stats)."""
    inputs, labels, dropped = [], [], 0
    for record, where in records:
        sides = []
        for messages in as_pair(record, where):
            docs = tokenize(render({"messages": messages}, where, tokenizer, "assistant")[-1:], tokenizer)
            if not docs:
                raise DataError(f"{where}: the chosen and rejected replies must end with an assistant message")
            sides.append(docs[0])
        check_vocabulary([i for d in sides for i in d.ids], vocab_size, where)
        pair_inputs, pair_labels = [], []
        for doc in sides:
            ids = doc.ids[: seq_len + 1]
            target = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], doc.trained[1: seq_len + 1])]
            padding = seq_len - (len(ids) - 1)
            pair_inputs.append(ids[:-1] + [pad] * padding)
            pair_labels.append(target + [IGNORE_INDEX] * padding)
        if any(all(t == IGNORE_INDEX for t in side) for side in pair_labels):
            dropped += 1
            continue
        inputs.append(pair_inputs)
        labels.append(pair_labels)
    if not inputs:
        raise DataError(f"none of the {len(records)} preference records has a reply inside train.seq_len="
                        f"{seq_len}; raise train.seq_len")
    blocks = Blocks(torch.tensor(inputs), torch.tensor(labels))
    blocks.stats.update(records=len(records), pairs=len(inputs), dropped=dropped)
    return blocks


def describe_pairs(blocks: Blocks, seq_len: int) -> str:
    st = blocks.stats
    dropped = (f", {st['dropped']} dropped: a reply entirely beyond train.seq_len={seq_len}" if st["dropped"]
               else "")
    return (f"dsrun: data: {st['records']} preference records -> {st['pairs']} pairs{dropped}; "
            f"{blocks.trained_tokens:,} reply tokens scored")


def as_rows(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs, 2, L] -> [2 x pairs, L]: every chosen reply, then every rejected one (TRL's order)."""
    return inputs.transpose(0, 1).flatten(0, 1), labels.transpose(0, 1).flatten(0, 1)


def sequence_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (the model's chunked head, dsrun/loss.py)."""
    token_losses, _ = model(**batch, per_row=True)
    return -token_losses


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss: str, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards β·(log π − log π_ref) of the chosen and the rejected reply."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:  # ipo: log-ratios averaged over each reply's tokens
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@torch.no_grad()
def reference_logps(model: Any, blocks: Blocks, micro_batch: int, device: torch.device,
                    to_inputs: Any) -> torch.Tensor:
    """[pairs, 2]: the model's log-probabilities of every reply as it is now (before the first step)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(blocks), micro_batch):
        inputs, labels = as_rows(blocks.inputs[start:start + micro_batch], blocks.labels[start:start + micro_batch])
        logps = sequence_logps(model, to_inputs(inputs, labels, None, device)).float().cpu()
        out.append(torch.stack(logps.chunk(2), dim=1))
    model.train(was_training)
    return torch.cat(out)


def preference_data(data_cfg: DataConfig, tokenizer: Any, seq_len: int,
                    vocab_size: int) -> tuple[Blocks, Blocks | None, str]:
    """The pairs of `data` (a JSONL of preference records, or the built-in reasoning chats as pairs), the held-out
    pairs (data.eval_split, after dropping exact duplicates, or data.eval_path) and the console's data line."""
    from dsrun.data import held_out
    from dsrun.sources import source_records

    records, held, note = held_out(source_records(data_cfg), data_cfg)
    if data_cfg.source == "reasoning":
        records = [(reasoning_pair(record), where) for record, where in records]
        held = [(reasoning_pair(record), where) for record, where in held] if held is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    blocks = preference_blocks(records, tokenizer, seq_len, vocab_size, pad)
    eval_blocks = preference_blocks(held, tokenizer, seq_len, vocab_size, pad) if held is not None else None
    line = describe_pairs(blocks, seq_len) + note
    return blocks, eval_blocks, line + (f"; eval set: {len(eval_blocks)} pairs" if eval_blocks is not None else "")


class PreferenceLoss:
    """The per-pair loss of one micro-batch of pairs, and the rewards it logs (summed on the device; read at log
    steps). `reference_off` is the adapters-off context of a LoRA model, or None where the reference
    log-probabilities travel with the batch (computed before the first step)."""

    def __init__(self, beta: float, loss: str, reference_off: Any, device: torch.device):
        self.beta, self.loss, self.reference_off = beta, loss, reference_off
        self.per_row = 1  # a drawn row is one pair: the step's loss is a mean over pairs
        self.sums = torch.zeros(4, device=device)  # chosen reward, rejected reward, pairs ranked right, pairs

    def __call__(self, model: Any, batch: tuple[Any, ...], to_inputs: Any) -> torch.Tensor:
        losses, chosen_reward, rejected_reward = self.pair_terms(model, batch, to_inputs)
        self.sums += torch.stack([chosen_reward.sum(), rejected_reward.sum(),
                                  (chosen_reward > rejected_reward).sum().float(),
                                  torch.tensor(float(len(losses)), device=losses.device)])
        return losses.sum()

    def pair_terms(self, model: Any, batch: tuple[Any, ...],
                   to_inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss, the chosen and the rejected reply's implicit reward."""
        inputs, labels, _, *reference = batch
        rows, row_labels = as_rows(inputs, labels)
        kwargs = to_inputs(rows, row_labels)
        tokens = (kwargs["labels"] != IGNORE_INDEX).sum(1).float()
        if reference:
            ref = reference[0].to(tokens.device, non_blocking=True)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:  # the reference first: the adapters' forward with gradients comes last, as DDP expects
            with torch.no_grad(), self.reference_off():
                ref_chosen, ref_rejected = sequence_logps(model, kwargs).float().chunk(2)
        chosen, rejected = sequence_logps(model, kwargs).float().chunk(2)
        return dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss, *tokens.chunk(2))

    def metrics(self, reduce: Any) -> dict[str, float]:
        """The log interval's means (summed over ranks by `reduce`), then zeroed."""
        chosen, rejected, right, pairs = reduce(self.sums.clone()).tolist()
        self.sums.zero_()
        if not pairs:
            return {}
        return {"rewards_chosen": chosen / pairs, "rewards_rejected": rejected / pairs,
                "reward_margin": (chosen - rejected) / pairs, "reward_accuracy": right / pairs}


class PreferenceEvaluator(Evaluator):
    """task=dpo's eval pass over held-out pairs (data.eval_split / data.eval_path): the DPO loss per pair, the
    reward margin and accuracy. As dsrun/evaluate.py's, every rank runs the same number of forwards (the last
    global micro-batch is filled with pairs that count for nothing)."""

    SIZE = "holds {} pairs"

    def __init__(self, blocks: Blocks, micro_batch: int, rank: int, data_parallel: int, loss: PreferenceLoss):
        super().__init__(blocks, micro_batch, rank, data_parallel)
        self.loss = loss

    def __call__(self, model: Any, fabric: Any, embedding: Any = None) -> dict[str, float]:
        def to_inputs(inputs: torch.Tensor, labels: torch.Tensor, positions: Any = None) -> dict[str, Any]:
            return model_inputs(inputs, labels, positions, fabric.device, embedding)

        totals = torch.zeros(5, dtype=torch.float64, device=fabric.device)  # loss, chosen, rejected, right, pairs
        model.eval()
        with torch.no_grad():
            for step in range(self.steps):
                batch, real = self._rows(step)
                real = real.to(fabric.device, torch.float64)
                losses, chosen, rejected = self.loss.pair_terms(model, batch, to_inputs)
                totals += torch.stack([(losses.double() * real).sum(), (chosen.double() * real).sum(),
                                       (rejected.double() * real).sum(), ((chosen > rejected).double() * real).sum(),
                                       real.sum()])
        model.train()
        if fabric.world_size > 1:
            totals = fabric.all_reduce(totals, reduce_op="sum")
        loss, chosen, rejected, right, pairs = totals.tolist()
        return {"eval_loss": loss / pairs, "eval_reward_margin": (chosen - rejected) / pairs,
                "eval_reward_accuracy": right / pairs}
