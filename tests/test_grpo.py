"""GRPO's pieces (issue 32; `task=grpo` is not wired yet): per-token log-probabilities through the chunked head,
rewards, group advantages and the loss — equal to TRL's GRPOTrainer for the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from dsrun.errors import ConfigError
from dsrun.grpo import (check_group_size, exact_answer, final_answer, group_advantages, grpo_loss, reward_function,
                        thinking_format)
from dsrun.loss import ChunkedTokenLogProbs
from tests.conftest import model_cfg


def test_chunked_token_log_probs_equal_the_whole_logits_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    mine = ChunkedTokenLogProbs.apply(hidden, weight, labels, 7)  # 6 chunks, the last one short
    (mine * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    whole = (hidden @ weight.T).log_softmax(1).gather(1, labels[:, None]).squeeze(1)
    (whole * upstream).sum().backward()
    assert torch.allclose(mine, whole, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_rewards():
    reply = "<think>\n4 + 4: 8.\n</think>\n\n4 + 4 = 8."
    assert final_answer(reply) == "8" and exact_answer(reply, "8") == 1.0 and exact_answer(reply, "9") == 0.0
    assert exact_answer("4 + 4 = 8.", "8") == 0.0  # no closed thinking part: no answer
    assert thinking_format(reply) == 1.0 and thinking_format("8") == 0.0 and thinking_format("<think>x</think>") == 0.0
    assert reward_function("exact_answer") is exact_answer
    assert reward_function("tests.test_grpo.length_reward")("abc", None) == 3.0


def length_reward(completion: str, answer: str | None) -> float:
    return float(len(completion))


@pytest.mark.parametrize("name,fragment", [("nowhere.reward", "does not import (ModuleNotFoundError"),
                                           ("tests.test_grpo.missing", "does not import (AttributeError"),
                                           ("tests.test_grpo.REWARDLESS", "is not a function")])
def test_a_reward_that_does_not_import_is_one_line(name, fragment):
    with pytest.raises(ConfigError) as caught:
        reward_function(name)
    assert len(caught.value.problems) == 1 and fragment in caught.value.problems[0]


REWARDLESS = 3


def test_a_group_of_one_is_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        check_group_size(1)


def test_grpo_loss_and_advantages_equal_trls(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is a test-only dependency (./setup.sh --dev installs it)")
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import nanstd

    from dsrun.data import load_tokenizer
    from dsrun.loss import token_log_probs

    torch.manual_seed(0)
    fields = OmegaConf.to_container(model_cfg("tiny_qwen2").fields)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields))
    ours = copy.deepcopy(model)
    # built with beta 0 (else TRL loads a reference model from the Hub by the config's name), the KL weight set
    # after: the loss reads trainer.beta and takes the reference's log-probs from its inputs
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, beta=0.0,
                          loss_type="grpo", report_to=[], use_cpu=True, bf16=False, max_completion_length=6)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                              train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
                              processing_class=load_tokenizer(model_cfg("tiny_qwen2")))
    trainer.beta = 0.04
    trainer.model.eval()  # no gradient-accumulation normaliser (set only inside training)
    prompts = torch.randint(0, 1000, (4, 5))
    completions = torch.randint(0, 1000, (4, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 2 + [0] * 4])
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    trl_advantages = (rewards - rewards.view(-1, 2).mean(1).repeat_interleave(2)) / (
        nanstd(rewards.view(-1, 2), dim=1).repeat_interleave(2) + 1e-4)
    advantages = group_advantages(rewards, 2)
    assert torch.allclose(advantages, trl_advantages)
    old = torch.randn(4, 6) * 0.1 - 11.8  # the sampling policy and the reference: near the model's log-probs (~ln 1/129280)
    ref = torch.randn(4, 6) * 0.1 - 11.8
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    hidden = ours.model(input_ids=torch.cat([prompts, completions], 1)).last_hidden_state[:, 4:-1]
    logps = token_log_probs(hidden.flatten(0, 1), ours.lm_head.weight, completions.flatten()).view(4, 6)
    mine, kl = grpo_loss(logps, old, ref, advantages, mask.float(), beta=0.04)
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5 * abs(theirs.item()), (mine.item(), theirs.item())
    assert kl is not None and kl.item() > 0
    for (name, a), b in zip(trainer.model.named_parameters(), ours.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-9, name
