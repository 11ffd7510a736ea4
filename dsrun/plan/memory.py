"""Memory of a plan: bytes per parameter, per shard and per token, and the peak of a training step or of decoding,
per device (and per node of host RAM for offloaded state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsrun.batch import data_parallel_size, group_rollouts, sequences_per_row, world_size
from dsrun.hardware import devices_per_node
from dsrun.optim import OPTIMIZERS
from dsrun.plan.assumptions import (ALLOCATOR_FRACTION, CUDA_CONTEXT_GIB, DEEPSPEED_BUCKET_ELEMENTS, GIB,
                                    NCCL_GIB, OFFLOAD_GATHERED_COPIES, TRANSIENT)
from dsrun.plan.shape import Shape
from dsrun.precision import PRECISIONS, Precision
from dsrun.quantize import QUANT_METHODS
from dsrun.strategy import STATE, STRATEGIES, Strategy

if TYPE_CHECKING:
    from dsrun.quantize import QuantConfig
    from dsrun.schema import RunConfig


def strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.parallel.strategy]


def precision(cfg: RunConfig) -> Precision:
    return PRECISIONS[cfg.precision.mode]


def bytes_per_param(cfg: RunConfig) -> dict[str, float]:
    """Bytes per trainable parameter before sharding: weights, gradients, optimizer states (master copy included).
    Mixed precision here means fp32 weights under autocast (16: 4 + 4 + 4 x 2 Adam moments)."""
    states = moments(cfg)
    if strategy(cfg).zero and precision(cfg).compute_bytes == 2:
        # ZeRO's layout: 16-bit weights and gradients, the fp32 master copy inside the optimizer
        return {"weights": 2, "gradients": 2, "optimizer": 4 + 4 * states}
    width = 2 if frozen_16bit(cfg) else precision(cfg).weight_bytes
    return {"weights": width, "gradients": width, "optimizer": state_bytes(cfg, width) * states}


def moments(cfg: RunConfig) -> int:
    """Optimizer states per parameter: Adam's two moments, SGD's momentum buffer if any."""
    return OPTIMIZERS[cfg.optim.name].states(cfg.optim)


def state_bytes(cfg: RunConfig, width: float) -> float:
    """Bytes per optimizer state element: the trained weight's width, or the optimizer's own (8-bit Adam)."""
    return OPTIMIZERS[cfg.optim.name].state_bytes or width


def shard_counts(cfg: RunConfig) -> dict[str, int]:
    """Into how many pieces weights, gradients and optimizer states are split across the processes."""
    sharded, n = strategy(cfg).shards(cfg.parallel), data_parallel_size(cfg)
    return {key: n if key in sharded else 1 for key in STATE}


def quant_bytes(quant: QuantConfig) -> tuple[float, float]:
    """(bytes per quantized weight, bytes of quantization constants per weight; per-row ones: quant_constants)."""
    method = QUANT_METHODS[quant.method]
    return (method.weight_bytes, method.constant_bytes(quant)) if method is not None else (0.0, 0.0)


def quant_constants(quant: QuantConfig, shape: Shape) -> float:
    """Bytes of every quantization constant of the quantizable weights: per weight and per output row."""
    method = QUANT_METHODS[quant.method]
    if method is None:
        return 0.0
    return shape.matmul * method.constant_bytes(quant) + shape.matmul_rows * method.row_constant_bytes


@dataclass(frozen=True)
class Dtypes:
    compute: int  # activations and gathered weights
    wide: int  # the residual stream and routed experts: fp32 under autocast, whose fp32 weights promote them
    autocast: bool  # single/ddp mixed precision: torch autocast over fp32 weights


def frozen_16bit(cfg: RunConfig) -> bool:
    """A frozen base under adapters is stored in the compute dtype (model.weight_dtype): no fp32 weights for
    autocast to cast, and a 16-bit residual stream."""
    return cfg.adapter.method != "none" and precision(cfg).compute_bytes == 2


def dtypes(cfg: RunConfig) -> Dtypes:
    autocast = precision(cfg).autocast and strategy(cfg).whole_model and not frozen_16bit(cfg)
    compute = precision(cfg).compute_bytes
    return Dtypes(compute, 4 if autocast else compute, autocast)


def _norm(width: int, d: Dtypes, consumers: int = 1, inner: bool = False) -> float:
    # RMSNorm keeps an fp32 copy of its input and the normalised tensor; under autocast every matmul reading the
    # (fp32) output saves its own low-precision cast of it
    if d.autocast:
        return width * (4 + (d.compute if inner else 4) + d.compute * consumers)
    return width * (4 + 2 * d.compute)


def block_activations(config: Any, moe: bool, d: Dtypes) -> tuple[float, float]:
    """(replicated, tensor-parallel-split) bytes one decoder block saves for backward per token, with a fused
    attention kernel (q, k, v, output and a small logsumexp). Checked against CPU runs in tests/test_plan.py."""
    h, c, heads = config.hidden_size, d.compute, config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):  # MLA: latent projections, then per-head keys and values
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q_lora = getattr(config, "q_lora_rank", None)
        norms = _norm(h, d, 2) + _norm(config.kv_lora_rank, d, inner=True) + (_norm(q_lora, d, inner=True)
                                                                              if q_lora else 0)
        # kv_b output (attention reads values from it), query, key, attention output, o_proj input
        split = c * heads * ((nope + v) + 2 * (nope + rope) + 2 * v)
    else:
        head_dim = getattr(config, "head_dim", None) or h // heads
        q, kv = heads * head_dim, config.num_key_value_heads * head_dim
        norms, split = _norm(h, d, 3), c * (3 * q + 2 * kv)
    if moe:
        shared = config.moe_intermediate_size * (getattr(config, "n_shared_experts", 0) or 0)
        # the router reads an fp32 copy of the hidden state unless it already is fp32 (or autocast casts it)
        router = 12 * config.n_routed_experts + (4 * h if not d.autocast and c == 2 else 0)
        routed = config.num_experts_per_tok * (2 * h + 4 * config.moe_intermediate_size) * d.wide
        return norms + _norm(h, d, 3), split + routed + 4 * shared * c + router
    return norms + _norm(h, d, 2), split + 4 * config.intermediate_size * c


def activation_bytes_per_token(cfg: RunConfig, shape: Shape, lora_per_block: list[float]) -> float:
    d = dtypes(cfg)
    if d not in shape.cache:
        shape.cache[d] = [block_activations(shape.model.config, moe, d) for moe in shape.moe_blocks]
    tp = cfg.parallel.tensor_parallel_size if strategy(cfg).tensor_parallel else 1
    blocks = [rep + split / tp + lora for (rep, split), lora in zip(shape.cache[d], lora_per_block)]
    h = shape.model.config.hidden_size
    final = _norm(h, d)
    if cfg.parallel.activation_checkpointing and cfg.parallel.offload_activations:
        return max(blocks) + final  # block inputs wait in host memory (activation_offload.py)
    if cfg.parallel.activation_checkpointing:  # block inputs, plus one block recomputed during backward
        return len(blocks) * h * d.wide + max(blocks) + final
    return sum(blocks) + final


def lora_sizes(cfg: RunConfig, shape: Shape) -> tuple[int, list[float]]:
    """LoRA parameters, and per block the bytes per token they save (r-wide intermediates; under autocast the
    adapters re-cast the fp32 inputs their layer reads from a norm)."""
    blocks = [0.0] * len(shape.moe_blocks)
    if cfg.adapter.method != "lora":
        return 0, blocks
    targets, r, d = list(cfg.adapter.target_modules), cfg.adapter.r, dtypes(cfg)
    chosen = [lin for lin in shape.linears if targets == ["all-linear"] or lin[0] in targets]
    h = shape.model.config.hidden_size
    for _, _, block, fan_in in chosen:
        if block >= 0:
            blocks[block] += r * d.compute + (fan_in * d.compute if d.autocast and fan_in == h else 0)
    return r * sum(lin[1] for lin in chosen), blocks


# ---------------------------------------------------------------------------------------------------------------
# Memory.

def training_memory(cfg: RunConfig, shape: Shape, spec: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes per device at the step's peak, and bytes per node of host RAM (offloaded state)."""
    d, b, div = dtypes(cfg), bytes_per_param(cfg), shard_counts(cfg)
    run_by, tr = strategy(cfg), cfg.train
    lora_params, lora_act = lora_sizes(cfg, shape)
    # fp32 whatever the base's dtype
    adapter_bytes = {"weights": 4, "gradients": 4, "optimizer": state_bytes(cfg, 4) * moments(cfg)}
    trainable = 0 if lora_params else shape.total
    quantized = shape.matmul if cfg.quant.method != "none" else 0
    q_weight, _ = quant_bytes(cfg.quant)
    tp = cfg.parallel.tensor_parallel_size if run_by.tensor_parallel else 1
    spread = 1 - shape.tp * (1 - 1 / tp) / shape.total  # share of the weights one tensor-parallel rank holds
    tokens = tr.micro_batch * tr.seq_len * sequences_per_row(cfg)
    m = {
        "weights": ((shape.total - quantized) * b["weights"] + quantized * q_weight) * spread / div["weights"],
        "quant_constants": quant_constants(cfg.quant, shape) * spread / div["weights"],
        # autocast's low-precision weight copies live until backward has used them (bnb dequantizes on the fly);
        # a tied head multiplies with the embedding
        "compute_copy": (1 if precision(cfg).fp8 else 2) * (
            shape.matmul + (shape.head or shape.embedding) - quantized) if d.autocast else 0.0,
        "gathered": gathered_bytes(cfg, shape, lora_params) if gathers(cfg) else 0.0,
        "gradients": trainable * b["gradients"] * spread / div["gradients"],
        "optimizer_states": trainable * b["optimizer"] * spread / div["optimizer"],
        "lora": lora_params * sum(adapter_bytes[k] / div[k] for k in adapter_bytes),
        "comm_buffers": DEEPSPEED_BUCKET_ELEMENTS * 2 * (1 if cfg.parallel.zero_stage == 3 else 2)
        if run_by.zero else 0.0,
        "activations": tokens * activation_bytes_per_token(cfg, shape, lora_act),
        "logits_loss": logits_loss_bytes(cfg, shape, tokens, d),
    }
    if group_rollouts(cfg):  # task=grpo: the rollout engine's slots, one per completion of an optimizer step
        config = shape.model.config
        m["rollout_kv_cache"] = tokens * tr.accumulation * config.num_hidden_layers * \
            kv_bytes_per_token_layer(config, d.compute)
    host: dict[str, float] = {}
    if cfg.parallel.offload_embedding and shape.head:  # an untied, frozen table (validate() checks frozen)
        m["weights"] -= shape.embedding * b["weights"]
        host["embedding"] = shape.embedding * b["weights"] * devices_per_node(cfg.hardware)
    if cfg.parallel.activation_checkpointing and cfg.parallel.offload_activations:
        host["activations"] = tokens * len(shape.moe_blocks) * shape.model.config.hidden_size * d.wide * \
            devices_per_node(cfg.hardware)
    if cfg.parallel.offload and run_by.offloads and spec is not None:
        params_too = run_by.gathers(cfg.parallel)
        for key in ("optimizer_states", "gradients") + (("weights", "quant_constants", "lora") if params_too else ()):
            host[key], m[key] = m[key] * devices_per_node(cfg.hardware), 0.0
    # gradients are allocated during backward as saved activations are freed; DeepSpeed's buffers are permanent
    if tr.accumulation == 1 and not run_by.zero:
        m["backward_overlap"] = -min(m["gradients"], m["activations"] + m["logits_loss"])
    if spec is not None:
        m["cuda_context"] = (CUDA_CONTEXT_GIB + (NCCL_GIB if world_size(cfg) > 1 else 0)) * GIB
    m["allocator"] = ALLOCATOR_FRACTION * sum(m.get(k, 0) for k in TRANSIENT)
    if cfg.parallel.offload and run_by.offloads and not run_by.zero:  # FSDP's offload copies gathered weights
        m["allocator"] += OFFLOAD_GATHERED_COPIES * m["gathered"]
    return m, host


def logits_loss_bytes(cfg: RunConfig, shape: Shape, tokens: int, d: Dtypes) -> float:
    """The loss (dsrun/loss.py): one chunk of logits at a time — fp32 logits turned in place into their gradient,
    its compute-dtype copy, the matmul's output — plus the gradient of the hidden states. ZeRO-3 computes whole
    logits through the head (logits, fp32 copy, log-softmax and two fp32 gradients of that size)."""
    from dsrun.loss import chunk_tokens

    vocab, h = shape.model.config.vocab_size, shape.model.config.hidden_size
    if (run_by := strategy(cfg)).zero and run_by.gathers(cfg.parallel):
        return tokens * vocab * ((4 if d.compute == 4 else 2) + 12)
    chunk = min(tokens, chunk_tokens(vocab, h, trains_head=cfg.adapter.method == "none"))
    return chunk * vocab * (4 + 2 * d.compute) + tokens * h * (d.wide + 4)


def gathers(cfg: RunConfig) -> bool:
    """Whether the strategy shards weights and gathers them block by block (FSDP, its TP mesh, ZeRO-3)."""
    return strategy(cfg).gathers(cfg.parallel)


def gather_bytes(cfg: RunConfig, params: int, matmul: int) -> float:
    """Bytes of `params` weights (`matmul` of them quantizable) once gathered: the compute dtype, or quantized."""
    width = precision(cfg).compute_bytes
    tp = cfg.parallel.tensor_parallel_size if strategy(cfg).tensor_parallel else 1
    per_weight = sum(quant_bytes(cfg.quant)) if cfg.quant.method != "none" else width
    return (matmul * per_weight + (params - matmul) * width) / tp


def gathered_bytes(cfg: RunConfig, shape: Shape, lora_params: int) -> float:
    """FSDP / ZeRO-3 working set: the root's embedding and head (kept gathered), two blocks (the one computing
    and the one prefetched) in the compute dtype, and one block's unsharded gradients before the reduce-scatter."""
    width = precision(cfg).compute_bytes
    trainable = lora_params / len(shape.moe_blocks) if lora_params else gather_bytes(cfg, shape.block, 0) / width
    return (shape.embedding + shape.head) * width + 2 * gather_bytes(cfg, shape.block, shape.block_matmul) + \
        trainable * (width + 4)


def inference_memory(cfg: RunConfig, shape: Shape, spec: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    config, pl = shape.model.config, cfg.plan
    c, n = precision(cfg).compute_bytes, world_size(cfg)
    if cfg.quant.method != "none":
        per_weight, _ = quant_bytes(cfg.quant)
        constants = quant_constants(cfg.quant, shape)
    elif precision(cfg).fp8:  # e4m3 weights with one fp32 scale per 128 x 128 block (DeepSeek's layout)
        per_weight, constants = 1.0, shape.matmul * 4 / 128**2
    else:
        per_weight, constants = c, 0.0
    lora_params, _ = lora_sizes(cfg, shape)
    tokens = pl.batch * pl.context
    m = {"weights": ((shape.total - shape.matmul) * c + shape.matmul * per_weight) / n,
         "quant_constants": constants / n, "lora": lora_params * c / n,
         "kv_cache": tokens * config.num_hidden_layers * kv_bytes_per_token_layer(config, c) / n,
         # prefill of the whole context, one layer at a time, and the last token's fp32 logits
         "working_set": tokens * c * (2 * config.hidden_size + _widest(config)) + pl.batch * config.vocab_size * 4}
    if spec is not None:
        m["cuda_context"] = (CUDA_CONTEXT_GIB + (NCCL_GIB if n > 1 else 0)) * GIB
    host: dict[str, float] = {}
    if cfg.parallel.offload and spec is not None:  # device_map="auto": what does not fit stays in host RAM
        room = spec["vram_gib"] * GIB - sum(m.values()) + m["weights"] - ALLOCATOR_FRACTION * sum(
            m.get(k, 0) for k in TRANSIENT)
        on_gpu = min(m["weights"], max(0.0, room))
        host["weights"], m["weights"] = (m["weights"] - on_gpu) * devices_per_node(cfg.hardware), on_gpu
    m["allocator"] = ALLOCATOR_FRACTION * sum(m.get(k, 0) for k in TRANSIENT)
    return m, host


def kv_bytes_per_token_layer(config: Any, width: int) -> int:
    """What the cache keeps per token and layer: MLA its compressed latent and the shared rope key, others a key
    and a value per key/value head."""
    if getattr(config, "kv_lora_rank", None):
        return (config.kv_lora_rank + config.qk_rope_head_dim) * width
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * width


def _widest(config: Any) -> int:
    """Widest per-token intermediate of a layer in inference: MLP (gate, up, product), routed copies, attention."""
    if getattr(config, "kv_lora_rank", None):
        qk, nv = config.qk_nope_head_dim + config.qk_rope_head_dim, config.qk_nope_head_dim + config.v_head_dim
        attention = config.num_attention_heads * (2 * qk + nv + config.v_head_dim)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    mlp = 3 * config.intermediate_size
    if getattr(config, "n_routed_experts", None):
        e = config.moe_intermediate_size
        mlp = max(mlp, config.num_experts_per_tok * (config.hidden_size + 3 * e)
                  + 3 * e * (getattr(config, "n_shared_experts", 0) or 0))
    return max(mlp, attention)
