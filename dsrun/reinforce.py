"""task=grpo: reinforcement learning from verifiable rewards (GRPO), one optimizer step at a time.

Each micro-batch draws `train.micro_batch` prompts. The `task.generations` completions of every prompt of an optimizer
step (its `train.accumulation` micro-batches: the weights do not change within it) are sampled together, in one pass
of the engine `dsrun generate` and `dsrun serve` run (dsrun/inference/engine.py), on the training weights themselves
in this process: the engine decodes through the model's own layers, LoRA adapters included, so there is no second
copy and nothing to merge; its KV cache of micro_batch x accumulation x generations slots is allocated once (one
decode step of many rows costs about what one of few does: the weights' reads set its time). The rewards
(dsrun/grpo.py: exact answer after `</think>`, format, or a function named by its dotted path) are summed per
completion and normalised within each prompt's group; the loss is GRPO's (TRL's GRPOTrainer, `loss_type="grpo"`,
one update per rollout), with β·KL to the reference — the model with its adapters off — where `task.beta` > 0.
Per-token log-probabilities go through the chunked head (dsrun/loss.py): the vocabulary's logits are never held
for a whole completion.

A completion's sampling seed is a function of (train.seed, step, prompt, completion), so a resumed run draws the
completions the uninterrupted one drew.
"""

from __future__ import annotations

import queue
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

from dsrun.errors import DataError
from dsrun.chat import check_vocabulary
from dsrun.grpo import final_answer, group_advantages, grpo_loss, reward_function
from dsrun.inference.chat import render, stop_ids
from dsrun.inference.engine import Engine, Request, compile_wanted
from dsrun.inference.metrics import ServerMetrics
from dsrun.packing import IGNORE_INDEX, Blocks

if TYPE_CHECKING:
    from dsrun.sources import DataConfig

NUMERIC = ("What is ", "Which is larger", "How many times")  # built-in questions answered by a number


@dataclass
class Prompts(Blocks):
    """Prompt token ids [prompts, longest] (right-padded with 0; `lengths` says where each ends) and the expected
    answer of each. A batch of them is (ids, lengths, index into `answers`)."""

    lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    answers: list[str] = field(default_factory=list)

    def rows(self, index: torch.Tensor) -> tuple[Any, ...]:
        return self.inputs[index], self.lengths[index], index


def prompt_record(record: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A JSONL record's prompt (a string, or a list of messages) and its answer."""
    if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: a GRPO record needs `prompt` (a string or a list of messages) and `answer` (what "
                        f"the reward compares the reply's final answer with); found: {found}")
    prompt = record["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: `prompt` must be a string or a non-empty list of messages")
    return prompt, str(record["answer"]).strip()


def reasoning_prompt(record: dict[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """A built-in reasoning chat with a number for an answer (the arithmetic ones): its question and that number."""
    *prompt, reply = record["messages"]
    if not prompt[-1]["content"].startswith(NUMERIC):
        return None
    answer = final_answer(reply["content"])
    return (prompt, answer) if answer is not None else None


def prompt_data(data_cfg: DataConfig, tokenizer: Any, max_prompt: int, vocab_size: int) -> tuple[Prompts, str]:
    """The prompts of `data` (JSONL records with prompt/answer, or the built-in arithmetic questions), rendered by
    the chat template up to where the assistant speaks; the console's data line."""
    from dsrun.sources import source_records

    records = source_records(data_cfg)
    if data_cfg.source == "reasoning":
        found = [reasoning_prompt(record) for record, _ in records]
        pairs = [(p, where) for p, (_, where) in zip(found, records) if p is not None]
    else:
        pairs = [(prompt_record(record, where), where) for record, where in records]
    ids, answers, dropped = [], [], 0
    for (messages, answer), where in pairs:
        tokens = render(tokenizer, messages)
        check_vocabulary(tokens, vocab_size, where)
        if len(tokens) > max_prompt:
            dropped += 1
            continue
        ids.append(tokens)
        answers.append(answer)
    if not ids:
        raise DataError(f"none of the {len(pairs)} prompts fits in {max_prompt} tokens (train.seq_len minus "
                        "task.max_completion_tokens, or half of train.seq_len); raise train.seq_len")
    width = max(map(len, ids))
    inputs = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    prompts = Prompts(inputs, torch.full((len(ids), 1), IGNORE_INDEX), lengths=torch.tensor(list(map(len, ids))),
                      answers=answers)
    note = f", {dropped} longer than {max_prompt} tokens dropped" if dropped else ""
    return prompts, f"dsrun: data: {len(ids)} prompts with answers{note}; up to {width} tokens each"


def sharded_modules(model: Any) -> list[Any]:
    """The modules FSDP (fully_shard) shards, outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def whole_weights(model: Any) -> Iterator[None]:
    """Under FSDP (fully_shard): every sharded module's weights gathered once, here in the calling thread with every
    rank in step, and kept gathered until the block ends — the engine's forwards then run no collective, so the
    ranks may decode different numbers of steps. A no-op for unsharded models."""
    sharded = sharded_modules(model)
    if not sharded:
        yield
        return
    # the outermost module is FSDP's root: initialised before a block's own forward would make that block the root
    sharded[0]._get_fsdp_state()._lazy_init()
    states = [m._get_fsdp_state() for m in sharded]
    saved = [(st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups])
             for st in states]  # restored as they were (torch's setter has no getter)
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module, state, (auto, infos) in zip(sharded, states, saved):
            module.reshard()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info


def prompt_budget(task: Any, seq_len: int) -> int:
    """Prompt tokens at most: what task.max_completion_tokens leaves of train.seq_len, else half of it."""
    return seq_len - (task.max_completion_tokens or seq_len // 2)


def completion_budget(task: Any, max_len: int, prompt: int) -> int:
    """New tokens at most for one prompt: task.max_completion_tokens, else what the sequence leaves after it."""
    return task.max_completion_tokens or max_len - 1 - prompt


def completion_seed(seed: int, step: int, prompt: int, completion: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + prompt * 104_729 + completion * 15_485_863) % (2**31 - 1)


class GroupPolicy:
    """task=grpo's rollouts and loss. `rollout` turns an optimizer step's micro-batches of prompts into training
    rows (prompt + completion, the completion's tokens labelled) with each completion's advantage; calling the
    object on a micro-batch's rows returns its loss summed over its completions. Rewards, KL and lengths are summed
    for the log (`metrics`)."""

    def __init__(self, task: Any, seed: int, model: Any, wrapped: Any, tokenizer: Any, prompts: Prompts,
                 rows: int, max_len: int, reference_off: Any, rank_zero: bool = True):
        self.task, self.seed, self.tokenizer, self.prompts = task, seed, tokenizer, prompts
        self.hint = rank_zero  # the note on a first log interval without any reward, once
        self.generations = task.generations
        self.rewards = {name: reward_function(name, "task.rewards") for name in task.rewards}
        self.reference_off = reference_off
        self.model = model  # the transformers model inside the wrappers: the engine runs its layers
        device = next(model.parameters()).device
        self.stop = stop_ids(tokenizer, model)
        self.max_len = max_len
        self.wrapped = wrapped  # the training model as the strategy wrapped it (FSDP gathers through it)
        was_training = model.training
        model.eval()  # compiled as the rollouts run it: no dropout (a mode change would be a recompile)
        # FSDP's gathered weights get new addresses at every gather, and a CUDA graph reads fixed ones: eager there
        compiled = compile_wanted(task.compile, device) and not sharded_modules(wrapped)
        with whole_weights(wrapped):  # the engine's first forward allocates its cache
            slots = rows * self.generations  # every completion of an optimizer step's prompts
            self.engine = Engine(model, slots=slots, max_len=max_len, metrics=ServerMetrics(), max_queue=slots,
                                 seed=seed, compile=compiled)
            # only the shapes rollouts start in: all slots at the lengths they reach (a bucket is a CUDA graph to
            # record; the engine's full length, seq_len + 1, is one no rollout reaches). Fewer rows, once the last
            # slots have finished, are recorded when first run, without a recompile (the step is dynamic)
            prompt = int(prompts.lengths.max())
            longest = prompt + completion_budget(task, max_len, prompt)
            counts, lengths = self.engine.buckets(longest=longest)
            self.engine.warm_up(counts[-1:], lengths, setting="task.compile")
        model.train(was_training)
        names = [f"reward_{name.rpartition('.')[2]}" for name in self.rewards]
        self.names = ["reward", *names, "completion_length", "stopped", "kl", "completions"]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.per_row = self.generations  # sequences per drawn row (a prompt): the loss is a mean over them
        self.rollout_seconds, self.rollout_tokens = 0.0, 0  # this rank's, since the last log

    def close(self) -> None:
        self.engine.stop(0)

    @torch.no_grad()
    def rollout(self, model: Any, batches: list[tuple[Any, ...]], step: int) -> list[tuple[torch.Tensor, ...]]:
        """G completions of every prompt of the optimizer step's micro-batches, sampled together by the engine, and
        their rewards -> per micro-batch (inputs, labels, advantages): rows of prompt + completion, right-padded."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout while sampling
        with whole_weights(self.wrapped):
            # all of them before the first is read
            submitted = [self._submit(ids, lengths, index, step) for ids, lengths, index in batches]
            sampled = [self._collect(requests) for requests in submitted]
        model.train(was_training)
        self.rollout_seconds += time.perf_counter() - started
        self.rollout_tokens += sum(sum(lengths) for _, _, lengths, _ in sampled)
        return [self._rows(*micro_batch) for micro_batch in sampled]

    def _submit(self, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor,
                step: int) -> list[tuple[list[int], Request, str]]:
        """Every completion of a micro-batch's prompts, submitted to the engine."""
        requests = []
        for row, prompt in enumerate(index.tolist()):
            prompt_ids = ids[row, :lengths[row]].tolist()
            budget = completion_budget(self.task, self.max_len, len(prompt_ids))
            for g in range(self.generations):
                request = Request(ids=prompt_ids, max_new_tokens=budget, temperature=self.task.temperature, top_p=1.0,
                                  stop=self.stop, seed=completion_seed(self.seed, step, prompt, g))
                self.engine.submit(request)
                requests.append((prompt_ids, request, self.prompts.answers[prompt]))
        return requests

    def _collect(self, requests: list[tuple[list[int], Request, str]]
                 ) -> tuple[list[tuple[list[int], list[int]]], list[list[float]], list[int], int]:
        """A micro-batch's completions as they end, rewarded."""
        sequences, rewards, completion_lengths, stopped = [], [], [], 0
        for prompt_ids, request, answer in requests:
            completion = []
            while (event := self._next_event(request))[0] != "done":
                if event[0] == "error":
                    raise RuntimeError(f"a GRPO rollout failed: {event[1]}")
                completion += event[1]
            reason = event[1]
            stopped += reason == "stop"
            text = self.tokenizer.decode([t for t in completion if t not in self.stop], skip_special_tokens=False)
            rewards.append([float(fn(text, answer)) for fn in self.rewards.values()])
            sequences.append((prompt_ids, completion))
            completion_lengths.append(len(completion))
        return sequences, rewards, completion_lengths, stopped

    def _next_event(self, request: Request) -> tuple[str, Any]:
        """The request's next event; an engine whose thread has ended fails the rollout instead of hanging it."""
        while True:
            try:
                return request.events.get(timeout=1.0)
            except queue.Empty:
                if not self.engine.thread.is_alive():
                    raise RuntimeError("the rollout engine stopped before the completions were done") from None

    def _rows(self, sequences: list[tuple[list[int], list[int]]], rewards: list[list[float]],
              completion_lengths: list[int], stopped: int) -> tuple[torch.Tensor, ...]:
        """Training rows of the completions (prompt + completion, the completion labelled) and their advantages."""
        each = torch.tensor(rewards, dtype=torch.float64)  # [completions, reward functions]
        total = each.sum(1)
        advantages = group_advantages(total, self.generations).float()
        width = max(len(p) + len(c) for p, c in sequences) - 1
        inputs = torch.zeros(len(sequences), width, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (prompt_ids, completion) in enumerate(sequences):
            whole = prompt_ids + completion
            inputs[row, :len(whole) - 1] = torch.tensor(whole[:-1])
            labels[row, len(prompt_ids) - 1:len(whole) - 1] = torch.tensor(completion)
        n = len(sequences)
        self.sums[:-2] += torch.tensor([total.sum().item(), *each.sum(0).tolist(), float(sum(completion_lengths)),
                                        float(stopped)], dtype=torch.float64, device=self.sums.device)
        self.sums[-1] += n
        return inputs, labels, advantages

    def __call__(self, model: Any, batch: tuple[Any, ...], to_inputs: Any) -> torch.Tensor:
        """The micro-batch's GRPO loss, summed over its completions (the caller divides by the global count)."""
        inputs, labels, advantages = batch
        kwargs = to_inputs(inputs, labels)
        mask = kwargs["labels"] != IGNORE_INDEX
        advantages = advantages.to(mask.device, non_blocking=True)
        reference = None
        if self.task.beta:  # the reference first: the adapters' forward with gradients comes last, as DDP expects
            with torch.no_grad(), self.reference_off():
                reference = model(**kwargs, per_token=True)[0].float()
        logps = model(**kwargs, per_token=True)[0].float()
        # one update per rollout: the sampling policy is this one (TRL's num_iterations=1), the ratio is 1 and
        # its gradient that of the log-probabilities
        loss, kl = grpo_loss(logps, logps.detach(), reference, advantages, mask, self.task.beta,
                             self.task.epsilon, self.task.epsilon)
        if kl is not None:
            self.sums[-2] += kl.double() * len(inputs)
        return loss * len(inputs)

    def metrics(self, reduce: Any) -> dict[str, float]:
        """The log interval's means over its completions (summed over ranks by `reduce`), then zeroed."""
        sums = dict(zip(self.names, reduce(self.sums.clone()).tolist()))
        self.sums.zero_()
        n = sums.pop("completions")
        if not n:
            return {}
        out = {name: value / n for name, value in sums.items()}
        if self.hint and not any(value for name, value in sums.items() if name.startswith("reward")):
            print("dsrun: note: no completion earned a reward yet; GRPO learns from the completions that score above "
                  "their group's mean, so it starts from a model that already answers in the expected form (an R1 "
                  "distill, or your SFT run: model.init=pretrained model.path=<run>/model)", file=sys.stderr)
        self.hint = False
        # this rank's sampling speed: completion tokens over the time from submitting them to the last one's end
        out["rollout_tokens_per_s"] = self.rollout_tokens / self.rollout_seconds if self.rollout_seconds else 0.0
        self.rollout_seconds, self.rollout_tokens = 0.0, 0
        if not self.task.beta:
            out.pop("kl")
        return out


def describe_rollouts(task: Any, micro_batch: int, accumulation: int) -> str:
    length = task.max_completion_tokens or "train.seq_len minus the prompt's"
    return (f"dsrun: grpo: {micro_batch} prompts x {task.generations} completions per micro-batch, up to "
            f"{length} new tokens each, sampled at temperature {task.temperature} by the engine on the training "
            f"weights, {micro_batch * accumulation * task.generations} at a time (an optimizer step's); rewards: "
            f"{', '.join(task.rewards)}")

