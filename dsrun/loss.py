"""The causal-LM loss without `tokens x vocab` fp32 logits: the output head and cross-entropy run chunk by chunk.

A 152k vocabulary makes the logits the largest tensor of a small-batch step: 2,048 tokens hold 1.2 GiB of fp32
logits, plus their gradient in backward, where the whole 7B QLoRA step needs ~6 GiB. Here each chunk's logits live
only while that chunk's loss and gradients (with respect to the hidden states and the head weight) are computed,
during the forward pass; backward only scales those gradients. Same arithmetic as `head(h).float()` then
`cross_entropy`: logits in the compute dtype, softmax in fp32. Rows without a label (a fine-tune's prompts) never
reach the head.

The loss is computed inside the model's own forward (`attach_chunked_loss` replaces it), so every wrapper — DDP,
FSDP2 (the root unit gathers the head), peft, Fabric — sees an ordinary forward call returning
`(sum of token losses, number of tokens with a label)`.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100  # labels of positions that carry no loss (prompts, padding)
# what the decoder is given besides the tokens (dsrun/model_inputs.py: embedding rows from host memory, packed
# documents' bounds)
MODEL_KWARGS = ("inputs_embeds", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32 (110 tokens of a 152k vocabulary)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the head's matmul runs in: the autocast dtype where autocast is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, Any]:
    """One chunk: the sum of its labelled rows' cross-entropy (softmax in fp32) and, when wanted, its gradient with
    respect to the logits in their dtype (softmax - one_hot, zero on unlabelled rows), built in place over the
    fp32 logits."""
    dtype = logits.dtype
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    if not want_grad:
        return ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum(), None
    # one exponential of the logits serves the loss and the softmax (logsumexp, then exp(logits - lse), took two:
    # the eager path's elementwise work halves, what a CPU step of the default job spends most on after the matmuls)
    peak = logits.amax(dim=-1, keepdim=True)
    grad = logits.sub_(peak).exp_()
    sums = grad.sum(dim=-1, keepdim=True)
    total = ((peak + sums.log()).squeeze(1) - picked).mul(valid).sum()
    grad.div_(sums)
    grad[torch.arange(len(labels), device=labels.device), target] -= 1
    grad.mul_(valid[:, None])
    return total, grad.to(dtype)


# On CUDA the chunk's elementwise work is compiled into a few fused kernels: eagerly it reads and writes the fp32
# logits about six times (~46 bytes per logit; 8,192 tokens x 152k is 1.2 G logits a step), fused ~8. A compiler
# failure falls back to the eager function, which computes the same.
COMPILE_BACKEND = "inductor"
_fused: Any = None  # torch.compile(_loss_and_grad), made at the first CUDA chunk; False once it failed to compile


def chunk_elementwise(device: torch.device, want_grad: bool) -> Any:
    """`(logits, labels) -> (loss sum, grad or None)` for the chunks of a batch on `device`."""
    def run(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        global _fused
        if device.type == "cuda" and _fused is not False:
            if _fused is None:
                _fused = torch.compile(_loss_and_grad, backend=COMPILE_BACKEND)
            try:
                return _fused(logits, labels, want_grad)
            except (torch._dynamo.exc.TorchDynamoException, ImportError) as exc:
                print(f"dsrun: warning: the fused loss kernels did not compile ({type(exc).__name__}); the loss "
                      "runs unfused", file=sys.stderr)
                _fused = False
        return _loss_and_grad(logits, labels, want_grad)

    return run


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over labelled tokens of cross_entropy(hidden @ weight.T, labels), gradients computed in the forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: Any,
                chunk: int) -> torch.Tensor:
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gathered = rows is not None
        if gathered:
            hidden_rows, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
        else:
            hidden_rows = hidden
        grad_rows = torch.empty_like(hidden_rows) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        elementwise = chunk_elementwise(hidden.device, want_hidden or want_weight)
        for start in range(0, hidden_rows.shape[0], chunk):
            h = hidden_rows[start:start + chunk].to(dtype)
            part, grad = elementwise(h @ w.T, labels[start:start + chunk])
            total += part
            if grad_rows is not None:
                grad_rows[start:start + chunk] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.add_(grad.T @ h)  # fp32 sum of the chunks' products
        grad_hidden = grad_rows
        if grad_rows is not None and gathered:  # unlabelled rows get no gradient from the loss
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_rows)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.wants = (want_hidden, want_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        want_hidden, want_weight = ctx.wants
        grad_hidden = next(saved) * grad_output if want_hidden else None
        grad_weight = (next(saved) * grad_output).to(ctx.weight_dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None


class ChunkedTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[t, labels[t]] for every token t, a chunk of tokens' logits at a time in the
    forward and again in the backward (recomputed: each token's gradient weight is known only then). What GRPO's
    per-token ratios need without a [tokens, 152k] logits tensor."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        dtype = _compute_dtype(hidden, weight)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk].to(dtype) @ weight.to(dtype).T).float()
            lse[start:start + chunk] = logits.logsumexp(1)
            out[start:start + chunk] = logits.gather(1, labels[start:start + chunk, None]).squeeze(1) - \
                lse[start:start + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk].to(dtype)
            incoming = grad_out[start:start + ctx.chunk, None]
            # d logp[label] / d logits = onehot(label) - softmax, times each token's incoming gradient; the softmax
            # from the forward's logsumexp, in place over the recomputed logits (one [chunk, vocab] buffer)
            grad = (h @ w.T).float().sub_(lse[start:start + ctx.chunk, None]).exp_().mul_(-incoming)
            grad.scatter_add_(1, labels[start:start + ctx.chunk, None], incoming)
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.add_(grad.T.float() @ h.float())
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of `labels` [tokens] under the head `weight` [vocab, d] from `hidden`
    [tokens, d], chunked over tokens (ChunkedTokenLogProbs)."""
    chunk = chunk_tokens(weight.shape[0], weight.shape[1], weight.requires_grad)
    return ChunkedTokenLogProbs.apply(hidden, weight, labels, chunk)


def chunk_tokens(vocab: int, hidden: int, trains_head: bool) -> int:
    """Tokens per chunk: 64 MiB of fp32 logits where the head is frozen. Where the head trains, each chunk adds
    its product into the head's fp32 gradient (vocab x hidden, read and written once per chunk), so chunks of at
    least `hidden` tokens keep that pass a fraction of the chunk's matmuls (110-token chunks made the 1.5B
    full fine-tune step 1.5x slower); their logits are then about the size of the gradient they feed."""
    return max(1, CHUNK_ELEMENTS // vocab, hidden if trains_head else 0)


def label_rows(labels: torch.Tensor) -> torch.Tensor | None:
    """The flat positions of `labels` that carry a label, or None where all do. Computed on the host, where the
    batch is built: on the device, counting them would be a host sync every micro-batch."""
    labelled = labels.reshape(-1) != IGNORE_INDEX
    return None if bool(labelled.all()) else labelled.nonzero().squeeze(1)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the token losses of `hidden` [tokens, d] through the head `weight` [vocab, d]. Only `rows` (the
    labelled ones, `label_rows`) go through the head: a fine-tune masks its prompts (a third of the default data's
    tokens, most of them where prompts are long), and their logits would be computed only to be zeroed."""
    chunk = chunk_tokens(weight.shape[0], weight.shape[1], weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, chunk)


def full_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path, through the head module's own forward: what ZeRO-3 needs (it gathers a partitioned weight
    only when its module runs)."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def attach_chunked_loss(model: PreTrainedModel, chunked: bool = True) -> PreTrainedModel:
    """Make `model(input_ids=..., labels=...)` return (loss sum, labelled tokens) computed inside its forward.
    `model` is a transformers causal LM (before adapters or wrappers, which call its forward)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def forward(self: nn.Module, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                label_rows: torch.Tensor | None = None, per_row: bool = False, per_token: bool = False,
                **kwargs: Any):
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in MODEL_KWARGS}
        hidden = decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
        assert labels is not None, "a model with dsrun's loss attached is called with labels"
        if per_token:  # task=grpo: each labelled token's log-probability, 0 elsewhere: [rows, tokens]
            return token_logps(hidden.flatten(0, 1), labels.flatten()).view(labels.shape), None
        if per_row:  # task=dpo: one loss sum per sequence, each through the chunked head on its own
            return torch.stack([row_loss(hidden[i], labels[i]) for i in range(hidden.shape[0])]), None
        hidden, labels = hidden.flatten(0, 1), labels.flatten()
        if chunked:
            loss = chunked_cross_entropy(hidden, head.weight, labels, label_rows)
        else:
            loss = full_cross_entropy(head, hidden, labels)
        return loss, (labels != IGNORE_INDEX).sum()

    def token_logps(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        picked = labels[rows]
        if chunked:
            found = token_log_probs(hidden[rows], head.weight, picked)
        else:
            found = head(hidden[rows]).float().log_softmax(-1).gather(1, picked[:, None]).squeeze(1)
        return torch.zeros(labels.shape, dtype=found.dtype, device=found.device).index_put((rows,), found)

    def row_loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not chunked:
            return full_cross_entropy(head, hidden, labels)
        return chunked_cross_entropy(hidden, head.weight, labels, (labels != IGNORE_INDEX).nonzero().squeeze(1))

    model.forward = types.MethodType(forward, model)
    return model
