"""Fit before you buy: a recipe's per-GPU memory, speed and cost, from its config alone, on any machine.

`plan(cfg) -> Plan`. The model is counted exactly on the meta device. Memory is what one step holds at its peak,
the start of backward (weights, optimizer states, saved activations, fp32 logits), sharded the way the strategy
shards it; speed is FLOPs over an assumed fraction of the card's dense tensor rate plus the communication the
strategy cannot hide; cost is hardware amortisation plus electricity. When a recipe does not fit, each cheap change
is applied to a copy of the config and planned again. docs/planner.md derives every term and its assumptions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from dsrun.errors import UserError
from dsrun.hardware import cpu_cores, gpu_catalog, host_memory_gib, measured_links, measured_path
from dsrun.strategy import data_parallel_size, global_batch, world_size

GIB = 2**30

# Assumptions, each argued (and where possible measured) in docs/planner.md.
MFU = {"consumer": 0.30, "datacenter": 0.32}  # H100 anchor: 31.6 % eager (dense 1.5B, bf16 autocast)
MOE_EFFICIENCY = 0.25  # H100 anchor: MoE 7.9 % MFU on active parameters vs 31.6 % dense
QUANT_EFFICIENCY = {"none": 1.0, "int8": 0.3, "nf4": 0.4}  # H100 anchor: stock QLoRA 12 % MFU
FP8_EFFICIENCY = 0.6  # fp8 reaches 1.2x bf16's throughput, not 2x (scaling and casts)
CPU_FLOPS_PER_CORE, CPU_MFU, CPU_MEMORY_GBS = 160e9, 0.4, 50.0  # AVX-512 FMA at 2.5 GHz; DDR4/5 dual channel
CUDA_CONTEXT_GIB, NCCL_GIB = 0.5, 0.25
ALLOCATOR_FRACTION = 0.10  # of what a step allocates and frees: the caching allocator's reserved-but-unused
TRANSIENT = ("activations", "logits_loss", "compute_copy", "gathered", "gradients", "kv_cache", "working_set")
LINK_EFFICIENCY = 0.8  # of a link's one-way bandwidth, in NCCL rings and host copies
DECODE_BANDWIDTH_EFFICIENCY = 0.7
# Eager PyTorch runs Python and launches kernels per op; a small step waits on that instead of the GPU. H100 host,
# 1.5B shape: 3.0-4.5 ms per decoder block forward, x1.2 under autocast, +1.3-2.3 ms with LoRA adapters, varying
# that much from call to call (BENCHMARKS.md); the middle of that range
HOST_BLOCK_FORWARD_S, HOST_AUTOCAST_FACTOR, HOST_LORA_BLOCK_S = 3.8e-3, 1.2, 1.8e-3
HOST_MOE_FACTOR, HOST_COMPILED_FACTOR = 2.0, 0.3
STEP_BANDWIDTH_EFFICIENCY = 0.7  # of HBM bandwidth, in the optimizer step's and the norm's streaming kernels
# torch AdamW on the host streams weights, gradients and states: bytes/s per process (16-core H100 host: FSDP2
# 8.4 s a step for 1.78B fp32-state parameters, 20 s for 7.6B bf16 ones; DeepSpeed ZeRO-3 3.2 s for 1.78B)
HOST_OPTIMIZER_BYTES_PER_S = {"fsdp": 3.5e9, "deepspeed": 8.8e9}
# FSDP2 offload copies every block's weights in from host RAM on a side stream; the caching allocator reuses those
# buffers only after a sync, so it holds one more gathered working set (7B bf16 on a 24 GB cap: 4.7 GiB allocated,
# 11.2 reserved; 1.5B mixed: 9.3 allocated, 14.5 reserved)
OFFLOAD_GATHERED_COPIES = 1.0
HOST_POWER_FACTOR = 1.3  # wall power of the box per watt of GPU TDP (CPU, fans, PSU losses)
NETWORK_GBPS = {"ethernet": 2.5, "infiniband": 400.0}  # seed 000's 2.5 GbE switch; one NDR port per GPU
COLLECTIVE_LATENCY_S = {"nvlink": 10e-6, "pcie": 30e-6, "network": 100e-6}
DEEPSPEED_BUCKET_ELEMENTS = 5e8  # reduce_bucket_size (strategy.deepspeed_config); allgather bucket: DeepSpeed default
MIXED = ("16-mixed", "bf16-mixed", "fp8")
TP_PROJECTIONS = tuple(f"{m}.{p}_proj" for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                       for p in ps)


@dataclass
class Suggestion:
    change: str  # what to do, in words
    overrides: list[str]  # the command-line overrides that make the change
    fits: bool
    total_gib: float
    vram_gib: float
    host_gib: float
    tokens_per_s: float
    usd_per_million_tokens: float | None
    hardware_usd: float  # purchase price of the cards the change needs; 0 for the cards you have
    pending: str | None = None  # the issue an option lands with, when it is not runnable yet


@dataclass
class Plan:
    mode: str  # train | inference
    fits: bool
    total_gib: float  # peak per device
    vram_gib: float  # capacity per device (host RAM per process for hardware=cpu)
    components: dict[str, float]  # GiB per device, summing to total_gib
    host_gib: float  # host RAM per node that offloaded state needs
    host_components: dict[str, float]
    tokens_per_s: float  # training tokens/s, or decoded tokens/s over the batch
    step_time_s: float  # an optimizer step, or one decode step
    time_to_first_token_s: float | None
    mfu: float  # the assumed model-FLOPs utilisation
    hours_per_million_tokens: float
    usd_per_million_tokens: float | None  # None on CPU: no price for this machine
    usd_per_hour: dict[str, float]
    hardware_usd: float
    device: str
    recipe: dict[str, Any]
    parameters: dict[str, int]
    flops_per_token: float
    verdict: str
    suggestions: list[Suggestion] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# The config as plain data: cheap to copy and change for re-planning.

class Box(dict):
    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def boxed(value: Any) -> Any:
    """A deep copy as Box/list/scalars (from a DictConfig, dict or Box)."""
    if isinstance(value, dict):
        return Box({k: boxed(v) for k, v in value.items()})
    if isinstance(value, list):
        return [boxed(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    from omegaconf import OmegaConf

    return boxed(OmegaConf.to_container(value, resolve=True)) if OmegaConf.is_config(value) else value


@functools.cache
def _option(group: str, option: str) -> dict[str, Any]:
    """conf/<group>/<option>.yaml over the group's schema defaults, as Hydra composes it."""
    from dataclasses import fields

    from dsrun.cli import CONF_DIR
    from dsrun.config import RunConfig

    schema = {f.name: f.default_factory for f in fields(RunConfig)}[group]()
    return {**asdict(schema), **(yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {})}


def apply_overrides(cfg: Any, overrides: list[str]) -> Box:
    """A copy of cfg with Hydra-style overrides applied: `group=option` (its conf/ file) or `a.b=value`."""
    new = boxed(cfg)
    for item in overrides:
        key, value = item.split("=", 1)
        if "." not in key:
            new[key] = boxed(_option(key, value))
            continue
        *path, last = key.split(".")
        node = new
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return new


# ---------------------------------------------------------------------------------------------------------------
# The model, counted exactly on the meta device (no memory, well under a second even for 671 B parameters).

@dataclass(frozen=True)
class Shape:
    model: Any  # on the meta device; flops_per_token() reads it
    total: int
    embedding: int
    head: int  # 0 when tied to the embedding
    matmul: int  # every linear and expert weight but the head: what int8/nf4 quantize
    matmul_rows: int  # their output rows (int8 keeps one fp32 scale per row)
    routed: int  # routed-expert weights, all experts
    active: int  # parameters one token multiplies with (model.active_matmul_params)
    tp: int  # weights tensor parallel splits
    block: int  # parameters of the largest decoder block: what FSDP / ZeRO-3 gathers at once
    block_matmul: int
    moe_blocks: tuple[bool, ...]
    linears: tuple[tuple[str, int, int, int], ...]  # (leaf name, in + out, block, in_features): LoRA's targets
    cache: dict = field(default_factory=dict, compare=False, hash=False)


def model_shape(model_cfg: Any) -> Shape:
    model_cfg, keys = boxed(model_cfg), ("arch", "init", "path", "hub_id", "trust_remote_code", "fields")
    return _shape(json.dumps({k: model_cfg[k] for k in keys}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _shape(key: str) -> Shape:
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from dsrun.model import active_matmul_params, architecture
    from dsrun.parallelize import decoder_blocks

    spec = SimpleNamespace(**json.loads(key), experts_implementation=None)
    try:
        config = architecture(spec)
    except OSError as exc:
        raise UserError(f"model.init=pretrained: cannot read the config.json of {spec.path or spec.hub_id} offline "
                        f"({str(exc).splitlines()[0]}); set model.path to a local folder, or plan with "
                        "model.init=random (the plan needs only the architecture)") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head_module = model.get_input_embeddings(), model.get_output_embeddings()
    blocks = decoder_blocks(model)
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    matmul, rows, tp, routed, linears = 0, 0, 0, 0, []
    block_matmul = [0] * len(blocks)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head_module:
            i = block_of.get(id(module.weight), -1)
            linears.append((name.rsplit(".", 1)[-1], module.in_features + module.out_features, i, module.in_features))
            matmul += module.weight.numel()
            rows += module.out_features
            tp += module.weight.numel() if name.endswith(TP_PROJECTIONS) else 0
            block_matmul[i] += module.weight.numel() if i >= 0 else 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:  # 3-D (experts, out, in) tensors
            routed += p.numel()
            matmul += p.numel()
            rows += p.shape[0] * p.shape[1]
            block_matmul[block_of[id(p)]] += p.numel()
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    largest = max(range(len(blocks)), key=sizes.__getitem__)
    tied = head_module.weight is embed.weight
    return Shape(model=model, total=sum(p.numel() for p in model.parameters()), embedding=embed.weight.numel(),
                 head=0 if tied else head_module.weight.numel(), matmul=matmul, matmul_rows=rows, routed=routed,
                 active=active_matmul_params(model), tp=tp, block=sizes[largest],
                 block_matmul=block_matmul[largest],
                 moe_blocks=tuple(any(".experts." in n for n, _ in b.named_parameters()) for b in blocks),
                 linears=tuple(linears))


# ---------------------------------------------------------------------------------------------------------------
# Bytes: per parameter, per shard, per token.

def bytes_per_param(cfg: Any) -> dict[str, float]:
    """Bytes per trainable parameter before sharding: weights, gradients, optimizer states (master copy included).
    Mixed precision here means fp32 weights under autocast (16: 4 + 4 + 4 x 2 Adam moments)."""
    mode, states = cfg.precision.mode, moments(cfg)
    if cfg.parallel.strategy == "deepspeed" and mode != "32-true":
        # ZeRO's layout: 16-bit weights and gradients, the fp32 master copy inside the optimizer
        return {"weights": 2, "gradients": 2, "optimizer": 4 + 4 * states}
    width = 2 if mode == "bf16-true" or frozen_16bit(cfg) else 4
    return {"weights": width, "gradients": width, "optimizer": width * states}


def moments(cfg: Any) -> int:
    """Optimizer states per parameter: Adam's two moments, SGD's momentum buffer if any."""
    return 2 if cfg.optim.name == "adamw" else int(bool(cfg.optim.momentum))


def shard_counts(cfg: Any) -> dict[str, int]:
    """Into how many pieces weights, gradients and optimizer states are split across the processes."""
    strategy, n = cfg.parallel.strategy, data_parallel_size(cfg)
    if strategy in ("fsdp", "tp"):
        return {"weights": n, "gradients": n, "optimizer": n}
    if strategy == "deepspeed":
        stage = cfg.parallel.zero_stage
        return {"weights": n if stage >= 3 else 1, "gradients": n if stage >= 2 else 1,
                "optimizer": n if stage >= 1 else 1}
    return {"weights": 1, "gradients": 1, "optimizer": 1}


def quant_bytes(quant: Any) -> tuple[float, float]:
    """(bytes per quantized weight, bytes of quantization constants per weight; int8's are per row)."""
    if quant.method == "nf4":
        # one absmax per 64 weights: fp32, or with double quantization 8-bit plus one fp32 per 256 of those
        return 0.5, (1 / 64 + 4 / (64 * 256)) if quant.double_quant else 4 / 64
    return (1.0, 0.0) if quant.method == "int8" else (0.0, 0.0)


@dataclass(frozen=True)
class Dtypes:
    compute: int  # activations and gathered weights
    wide: int  # the residual stream and routed experts: fp32 under autocast, whose fp32 weights promote them
    autocast: bool  # single/ddp mixed precision: torch autocast over fp32 weights


def frozen_16bit(cfg: Any) -> bool:
    """A frozen base under adapters is stored in the compute dtype (model.weight_dtype): no fp32 weights for
    autocast to cast, and a 16-bit residual stream."""
    return cfg.adapter.method != "none" and cfg.precision.mode != "32-true"


def dtypes(cfg: Any) -> Dtypes:
    mode = cfg.precision.mode
    autocast = mode in MIXED and cfg.parallel.strategy in ("single", "ddp") and not frozen_16bit(cfg)
    compute = 4 if mode == "32-true" else 2
    return Dtypes(compute, 4 if autocast or mode == "32-true" else compute, autocast)


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


def activation_bytes_per_token(cfg: Any, shape: Shape, lora_per_block: list[float]) -> float:
    d = dtypes(cfg)
    if d not in shape.cache:
        shape.cache[d] = [block_activations(shape.model.config, moe, d) for moe in shape.moe_blocks]
    tp = cfg.parallel.tensor_parallel_size if cfg.parallel.strategy == "tp" else 1
    blocks = [rep + split / tp + lora for (rep, split), lora in zip(shape.cache[d], lora_per_block)]
    h = shape.model.config.hidden_size
    final = _norm(h, d)
    if cfg.parallel.activation_checkpointing and cfg.parallel.get("offload_activations"):
        return max(blocks) + final  # block inputs wait in host memory (activation_offload.py)
    if cfg.parallel.activation_checkpointing:  # block inputs, plus one block recomputed during backward
        return len(blocks) * h * d.wide + max(blocks) + final
    return sum(blocks) + final


def _lora(cfg: Any, shape: Shape) -> tuple[int, list[float]]:
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

def training_memory(cfg: Any, shape: Shape, spec: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes per device at the step's peak, and bytes per node of host RAM (offloaded state)."""
    d, b, div = dtypes(cfg), bytes_per_param(cfg), shard_counts(cfg)
    strategy, tr = cfg.parallel.strategy, cfg.train
    lora_params, lora_act = _lora(cfg, shape)
    adapter_bytes = {"weights": 4, "gradients": 4, "optimizer": 4 * moments(cfg)}  # fp32 whatever the base's dtype
    trainable = 0 if lora_params else shape.total
    quantized = shape.matmul if cfg.quant.method != "none" else 0
    q_weight, q_const = quant_bytes(cfg.quant)
    tp = cfg.parallel.tensor_parallel_size if strategy == "tp" else 1
    spread = 1 - shape.tp * (1 - 1 / tp) / shape.total  # share of the weights one tensor-parallel rank holds
    tokens = tr.micro_batch * tr.seq_len
    m = {
        "weights": ((shape.total - quantized) * b["weights"] + quantized * q_weight) * spread / div["weights"],
        "quant_constants": (shape.matmul_rows * 4 if cfg.quant.method == "int8" else quantized * q_const)
        * spread / div["weights"],
        # autocast's low-precision weight copies live until backward has used them (bnb dequantizes on the fly);
        # a tied head multiplies with the embedding
        "compute_copy": (1 if cfg.precision.mode == "fp8" else 2) * (
            shape.matmul + (shape.head or shape.embedding) - quantized) if d.autocast else 0.0,
        "gathered": _gathered(cfg, shape, lora_params) if _gathers(cfg) else 0.0,
        "gradients": trainable * b["gradients"] * spread / div["gradients"],
        "optimizer_states": trainable * b["optimizer"] * spread / div["optimizer"],
        "lora": lora_params * sum(adapter_bytes[k] / div[k] for k in adapter_bytes),
        "comm_buffers": DEEPSPEED_BUCKET_ELEMENTS * 2 * (1 if cfg.parallel.zero_stage == 3 else 2)
        if strategy == "deepspeed" else 0.0,
        "activations": tokens * activation_bytes_per_token(cfg, shape, lora_act),
        "logits_loss": logits_loss_bytes(cfg, shape, tokens, d),
    }
    host: dict[str, float] = {}
    if cfg.parallel.activation_checkpointing and cfg.parallel.get("offload_activations"):
        host["activations"] = tokens * len(shape.moe_blocks) * shape.model.config.hidden_size * d.wide * \
            cfg.hardware.devices
    if cfg.parallel.offload and strategy in ("fsdp", "deepspeed") and spec is not None:
        params_too = strategy == "fsdp" or cfg.parallel.zero_stage == 3
        for key in ("optimizer_states", "gradients") + (("weights", "quant_constants", "lora") if params_too else ()):
            host[key], m[key] = m[key] * cfg.hardware.devices, 0.0
    # gradients are allocated during backward as saved activations are freed; DeepSpeed's buffers are permanent
    if tr.accumulation == 1 and strategy != "deepspeed":
        m["backward_overlap"] = -min(m["gradients"], m["activations"] + m["logits_loss"])
    if spec is not None:
        m["cuda_context"] = (CUDA_CONTEXT_GIB + (NCCL_GIB if world_size(cfg) > 1 else 0)) * GIB
    m["allocator"] = ALLOCATOR_FRACTION * sum(m.get(k, 0) for k in TRANSIENT)
    if cfg.parallel.offload and strategy == "fsdp":
        m["allocator"] += OFFLOAD_GATHERED_COPIES * m["gathered"]
    return m, host


def logits_loss_bytes(cfg: Any, shape: Shape, tokens: int, d: Dtypes) -> float:
    """The loss (dsrun/loss.py): one chunk of logits at a time — fp32 logits turned in place into their gradient,
    its compute-dtype copy, the matmul's output — plus the gradient of the hidden states. ZeRO-3 computes whole
    logits through the head (logits, fp32 copy, log-softmax and two fp32 gradients of that size)."""
    from dsrun.loss import chunk_tokens

    vocab, h = shape.model.config.vocab_size, shape.model.config.hidden_size
    if cfg.parallel.strategy == "deepspeed" and cfg.parallel.zero_stage == 3:
        return tokens * vocab * ((4 if d.compute == 4 else 2) + 12)
    chunk = min(tokens, chunk_tokens(vocab, h, trains_head=cfg.adapter.method == "none"))
    return chunk * vocab * (4 + 2 * d.compute) + tokens * h * (d.wide + 4)


def _gathers(cfg: Any) -> bool:
    """Whether the strategy shards weights and gathers them block by block (FSDP, its TP mesh, ZeRO-3)."""
    strategy = cfg.parallel.strategy
    return strategy in ("fsdp", "tp") or (strategy == "deepspeed" and cfg.parallel.zero_stage == 3)


def _gather_bytes(cfg: Any, params: int, matmul: int) -> float:
    """Bytes of `params` weights (`matmul` of them quantizable) once gathered: the compute dtype, or quantized."""
    width = 4 if cfg.precision.mode == "32-true" else 2
    tp = cfg.parallel.tensor_parallel_size if cfg.parallel.strategy == "tp" else 1
    per_weight = sum(quant_bytes(cfg.quant)) if cfg.quant.method != "none" else width
    return (matmul * per_weight + (params - matmul) * width) / tp


def _gathered(cfg: Any, shape: Shape, lora_params: int) -> float:
    """FSDP / ZeRO-3 working set: the root's embedding and head (kept gathered), two blocks (the one computing
    and the one prefetched) in the compute dtype, and one block's unsharded gradients before the reduce-scatter."""
    width = 4 if cfg.precision.mode == "32-true" else 2
    trainable = lora_params / len(shape.moe_blocks) if lora_params else _gather_bytes(cfg, shape.block, 0) / width
    return (shape.embedding + shape.head) * width + 2 * _gather_bytes(cfg, shape.block, shape.block_matmul) + \
        trainable * (width + 4)


def inference_memory(cfg: Any, shape: Shape, spec: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    config, pl = shape.model.config, cfg.plan
    c, n = (4 if cfg.precision.mode == "32-true" else 2), world_size(cfg)
    if cfg.quant.method != "none":
        per_weight, constant = quant_bytes(cfg.quant)
        constants = shape.matmul_rows * 4 if cfg.quant.method == "int8" else shape.matmul * constant
    elif cfg.precision.mode == "fp8":  # e4m3 weights with one fp32 scale per 128 x 128 block (DeepSeek's layout)
        per_weight, constants = 1.0, shape.matmul * 4 / 128**2
    else:
        per_weight, constants = c, 0.0
    lora_params, _ = _lora(cfg, shape)
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
        host["weights"], m["weights"] = (m["weights"] - on_gpu) * cfg.hardware.devices, on_gpu
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


# ---------------------------------------------------------------------------------------------------------------
# The plan.

def gpu_spec(cfg: Any) -> dict | None:
    """The catalog entry of the planned GPU; None for CPU plans."""
    hw = cfg.hardware
    if hw.accelerator == "cpu":
        return None
    if hw.gpu not in gpu_catalog():
        raise UserError(f"hardware.gpu={hw.gpu}: the plan needs a GPU from the catalog "
                        f"({', '.join(sorted(gpu_catalog()))}); set hardware.gpu=<one of them>")
    return gpu_catalog()[hw.gpu]


def measured_bandwidth(cfg: Any) -> dict[str, dict[str, Any]]:
    """The links `dsrun doctor` measured on this machine that this plan crosses, by scope: 'local' when it spans
    several devices of a node, 'network' when it spans nodes (unless plan.network_gbps is set by hand)."""
    hw = cfg.hardware
    return {scope: entry for scope, entry in measured_links(hw).items()
            if (scope == "local" and hw.devices > 1) or (scope == "network" and hw.num_nodes > 1
                                                          and not cfg.plan.network_gbps)}


def plan(cfg: Any, suggest: bool = True) -> Plan:
    """Memory, speed and cost of a composed, resolved, validated config (a DictConfig, dict or Box); when it does
    not fit and `suggest`, the changes that make it fit, each planned again."""
    cfg = boxed(cfg)
    spec, shape = gpu_spec(cfg), model_shape(cfg.model)
    inference = cfg.plan.mode == "inference"
    m, host = (inference_memory if inference else training_memory)(cfg, shape, spec)
    from dsrun.plan_speed import cost, inference_speed, training_speed

    speed = (inference_speed if inference else training_speed)(cfg, shape, spec, m, host)
    hours, usd, per_hour, price = cost(cfg, spec, speed["tokens_per_s"])
    capacity = spec["vram_gib"] if spec else host_memory_gib() / cfg.hardware.devices
    if cfg.hardware.get("memory_cap_gib"):  # snapshots older than the key lack it
        capacity = min(capacity, cfg.hardware.memory_cap_gib)
    total, host_total = sum(m.values()) / GIB, sum(host.values()) / GIB
    fits = total <= capacity and (cfg.plan.host_ram_gib is None or host_total <= cfg.plan.host_ram_gib)
    device = f"{world_size(cfg)} x {spec['name']}" if spec else f"{cfg.hardware.devices} x CPU process"
    result = Plan(
        mode=cfg.plan.mode, fits=fits, total_gib=total, vram_gib=capacity,
        components={k: v / GIB for k, v in m.items()}, host_gib=host_total,
        host_components={k: v / GIB for k, v in host.items()}, tokens_per_s=speed["tokens_per_s"],
        step_time_s=speed["step_time_s"], time_to_first_token_s=speed.get("time_to_first_token_s"),
        mfu=speed["mfu"], hours_per_million_tokens=hours, usd_per_million_tokens=usd, usd_per_hour=per_hour,
        hardware_usd=price, device=device, recipe=_recipe(cfg),
        parameters={"total": shape.total, "trainable": _lora(cfg, shape)[0] or (0 if inference else shape.total),
                    "active": shape.active, "embedding": shape.embedding},
        flops_per_token=speed["flops_per_token"], verdict="", assumptions=assumptions(cfg, spec))
    result.verdict = _verdict(result, cfg, spec)
    if suggest and not fits:
        from dsrun.plan_search import suggestions

        result.suggestions = suggestions(cfg)
    return result


def _recipe(cfg: Any) -> dict[str, Any]:
    recipe = {"model": cfg.model.name, "hardware": cfg.hardware.name, "gpu": cfg.hardware.gpu,
              "devices": cfg.hardware.devices, "num_nodes": cfg.hardware.num_nodes,
              "parallel": cfg.parallel.name, "strategy": cfg.parallel.strategy, "zero_stage": cfg.parallel.zero_stage,
              "offload": cfg.parallel.offload, "activation_checkpointing": cfg.parallel.activation_checkpointing,
              "precision": cfg.precision.mode, "quant": cfg.quant.method, "adapter": cfg.adapter.method}
    if cfg.plan.mode == "inference":
        return {**recipe, "context": cfg.plan.context, "batch": cfg.plan.batch}
    tr = cfg.train
    return {**recipe, "micro_batch": tr.micro_batch, "accumulation": tr.accumulation, "seq_len": tr.seq_len,
            "global_batch": global_batch(cfg), "optimizer": cfg.optim.name}


def _verdict(p: Plan, cfg: Any, spec: dict | None) -> str:
    where = "per GPU" if spec else "of host RAM per process"
    capped = cfg.hardware.get("memory_cap_gib") and cfg.hardware.memory_cap_gib <= p.vram_gib
    has = (f"hardware.memory_cap_gib caps it at {p.vram_gib:.1f} GiB" if capped else
           f"{spec['name'] if spec else 'this machine'} has {p.vram_gib:.1f} GiB")
    if not p.fits and p.total_gib > p.vram_gib:
        weights = sum(p.components.get(k, 0) + p.host_components.get(k, 0) / cfg.hardware.devices
                      for k in ("weights", "quant_constants"))
        return (f"does not fit: needs {p.total_gib:,.1f} GiB {where}, {has} ({p.total_gib / p.vram_gib:.1f}x); "
                f"the weights alone take {weights:,.1f} GiB {where}")
    if not p.fits:
        return f"does not fit: needs {p.host_gib:,.1f} GiB of host RAM per node, plan.host_ram_gib is " \
               f"{cfg.plan.host_ram_gib:,.1f}"
    share = p.total_gib / p.vram_gib
    tight = "; above 90 %: little room for fragmentation spikes (seed 004 halves the batch here)" if share > 0.9 else ""
    return f"fits: {p.total_gib:,.1f} of {p.vram_gib:.1f} GiB {where} ({share:.0%}){tight}"


def assumptions(cfg: Any, spec: dict | None) -> list[str]:
    pl = cfg.plan
    rate = {"32-true": "fp32 CUDA-core", "fp8": "fp8 tensor"}.get(cfg.precision.mode, "bf16/fp16 tensor")
    items = [f"MFU {pl.mfu or (MFU[spec['class']] if spec else CPU_MFU):.0%} of the "
             + (f"dense {rate} rate" if spec else "CPU's fp32 peak")
             + (f" ({spec['class']} GPUs)" if spec and not pl.mfu else "")
             + "; x0.25 for MoE, x0.3 int8 / x0.4 nf4, fp8 at 0.6 of its peak's share"]
    if spec:
        items.append(f"cost: {spec['name']} at ${pl.gpu_price_usd or spec['price_usd']:,.0f} "
                     f"({'your price' if pl.gpu_price_usd else spec['price_source']}) amortised over "
                     f"{pl.lifetime_years:g} years of continuous use; {spec['tdp_w']} W x {HOST_POWER_FACTOR} for "
                     f"the host at ${pl.electricity_usd_per_kwh}/kWh")
    else:
        items.append(f"CPU: {cpu_cores()} cores x {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s peak; no price for this "
                     "machine, so no cost")
    items.append("mixed precision = fp32 weights, gradients and Adam states + autocast copies (16 bytes/param; "
                 "ZeRO: 16-bit weights and gradients, fp32 master in the optimizer)")
    if measured := measured_bandwidth(cfg):
        items.append(f"links measured by dsrun doctor on this machine ({measured_path()}), not the catalog's: " +
                     "; ".join(f"{'within the node' if scope == 'local' else 'between nodes'} "
                               f"{e['bus_bandwidth_gbs']:.2f} GB/s bus bandwidth ({e['backend']}, {e['ranks']} ranks, "
                               f"{e['measured_at']})" for scope, e in measured.items()))
    if cfg.plan.mode == "train":
        items.append("peak at the start of backward; gradients reuse freed activations when accumulation is 1")
    else:
        items.append("weights and KV cache split evenly over the GPUs (tensor parallel); decode reads every "
                     "weight once per step at 70 % of the memory bandwidth")
    return items
