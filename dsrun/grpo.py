"""GRPO's pieces: verifiable rewards, group-normalised advantages and the clipped objective with a KL term to the
reference, as TRL's GRPOTrainer computes them (`loss_type="grpo"`, `scale_rewards="group"`, token-level importance
sampling) — tests/test_grpo.py holds them equal. The task around them (rollouts by the engine, the step):
dsrun/reinforce.py."""

from __future__ import annotations

import importlib
import re
from typing import Callable

import torch

from dsrun.errors import ConfigError

ANSWER_AFTER_THINKING = re.compile(r"</think>(.*)\Z", re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(completion: str) -> str | None:
    """The last number of what follows `</think>` (None without a closed thinking part or a number)."""
    found = ANSWER_AFTER_THINKING.search(completion)
    numbers = NUMBER.findall(found.group(1)) if found else []
    return numbers[-1] if numbers else None


def exact_answer(completion: str, answer: str) -> float:
    """1.0 when the final answer after `</think>` is the expected one, else 0.0."""
    return float(final_answer(completion) == str(answer).strip())


def thinking_format(completion: str, answer: str | None = None) -> float:
    """1.0 for a reply that reasons inside one `<think>...</think>` (the template may have opened it) and then
    answers after it, else 0.0."""
    closes = completion.count("</think>") == 1
    return float(closes and completion.count("<think>") <= 1 and bool(completion.split("</think>", 1)[1].strip()))


REWARDS: dict[str, Callable[..., float]] = {"exact_answer": exact_answer, "format": thinking_format}


def reward_function(name: str, key: str = "grpo.rewards") -> Callable[..., float]:
    """A built-in reward by name, or `package.module.function` imported: (completion, answer) -> float."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attribute) if module else None
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError([f"{key}: {name} does not import ({type(exc).__name__}: {exc}); name a built-in "
                           f"({', '.join(REWARDS)}) or a function as package.module.function"]) from None
    if not callable(found):
        raise ConfigError([f"{key}: {name} is not a function; name a built-in ({', '.join(REWARDS)}) or a function "
                           "as package.module.function (completion, answer) -> float"])
    return found


def check_group_size(generations: int | None, key: str = "grpo.generations") -> None:
    if generations is None or generations < 2:
        raise ConfigError([f"{key}={'null' if generations is None else generations}: GRPO compares completions within a group; it needs at least 2 "
                           "per prompt (8 is common)"])


def group_advantages(rewards: torch.Tensor, generations: int) -> torch.Tensor:
    """Each completion's reward minus its group's mean, over the group's standard deviation (Bessel-corrected,
    + 1e-4): [prompts x generations], groups consecutive."""
    grouped = rewards.view(-1, generations)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)  # unbiased, as TRL's nanstd
    return ((grouped - mean) / (std + 1e-4)).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, kl_importance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clipped surrogate per completion token, plus β·KL(π‖π_ref) (the k3 estimator, weighted by the
    importance ratio π/π_old as TRL does by default: the completions were sampled from π_old) where a reference
    is given, averaged over each completion's tokens, then over completions. Returns (loss, mean KL or None).
    logps/old_logps/ref_logps/mask: [completions, tokens]; advantages: [completions]."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0 and ref_logps is not None:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_importance:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl = ((per_token_kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return loss, kl
