"""Speed and cost of a plan (dsrun/plan/): FLOPs over an assumed fraction of the card's dense rate, plus the
communication a strategy cannot hide under backward; decode reads the weights once per step; cost is hardware
amortisation plus electricity per 1M tokens. The assumptions are constants in dsrun/plan/assumptions.py
(docs/planner.md)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dsrun.allreduce import all_reduce_seconds
from dsrun.batch import (data_parallel_size, global_batch, group_rollouts, preference_pairs, sequences_per_row,
                         world_size)
from dsrun.hardware import cpu_cores, devices_per_node, measured_links, pcie_gbs
from dsrun.plan.assumptions import (COLLECTIVE_LATENCY_S, CPU_FLOPS_PER_CORE, CPU_MEMORY_GBS, CPU_MFU,
                                    DECODE_BANDWIDTH_EFFICIENCY, FP8_EFFICIENCY, HOST_AUTOCAST_FACTOR,
                                    HOST_BLOCK_FORWARD_S, HOST_COMPILED_FACTOR, HOST_LORA_BLOCK_S, HOST_MOE_FACTOR,
                                    HOST_POWER_FACTOR, LINK_EFFICIENCY, MFU, MOE_EFFICIENCY, NETWORK_GBPS,
                                    STEP_BANDWIDTH_EFFICIENCY)
from dsrun.plan.memory import bytes_per_param, dtypes, gather_bytes, gathers, lora_sizes, shard_counts, strategy
from dsrun.plan.shape import Shape
from dsrun.precision import PRECISIONS
from dsrun.quantize import QUANT_METHODS
from dsrun.strategy import STRATEGIES

if TYPE_CHECKING:
    from dsrun.hardware import HardwareConfig
    from dsrun.schema import RunConfig


def measured_bandwidth(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The links `dsrun doctor` measured on this machine that this plan crosses, by scope: 'local' when it spans
    several devices of a node, 'network' when it spans nodes (unless plan.network_gbps is set by hand)."""
    hw = cfg.hardware
    return {scope: entry for scope, entry in measured_links(hw).items()
            if (scope == "local" and devices_per_node(hw) > 1) or (scope == "network" and hw.num_nodes > 1
                                                          and not cfg.plan.network_gbps)}


def _rate(cfg: RunConfig, spec: dict | None, shape: Shape, mode: str | None = None) -> tuple[float, float]:
    """(FLOP/s per device the model's matmuls reach, assumed MFU)."""
    if spec is None:
        mfu = cfg.plan.mfu or CPU_MFU
        return cpu_cores() / devices_per_node(cfg.hardware) * CPU_FLOPS_PER_CORE * mfu, mfu
    mode = mode or cfg.precision.mode
    mfu = cfg.plan.mfu or MFU[spec["class"]]
    peak = spec[PRECISIONS[mode].peak]
    method = QUANT_METHODS[cfg.quant.method]
    efficiency = (FP8_EFFICIENCY if PRECISIONS[mode].fp8 else 1) * (method.compute_efficiency if method else 1.0) * \
        (MOE_EFFICIENCY if shape.routed else 1)
    return peak * 1e12 * mfu * efficiency, mfu


def _bandwidth(cfg: RunConfig, spec: dict | None) -> float:
    """Bytes/s a ring collective reaches per GPU (its bus bandwidth): the slowest link it crosses. A link
    `dsrun doctor` measured on this machine replaces the catalog's figure; plan.network_gbps set by hand wins."""
    hw, measured = cfg.hardware, measured_bandwidth(cfg)
    links = []
    if devices_per_node(hw) > 1:
        links.append(measured["local"]["bus_bandwidth_gbs"] * 1e9 if "local" in measured else _node_link(hw, spec))
    if "network" in measured:
        links.append(measured["network"]["bus_bandwidth_gbs"] * 1e9)
    elif hw.num_nodes > 1:
        links.append(5e9 if spec is None else
                     (cfg.plan.network_gbps or NETWORK_GBPS.get(hw.network, 2.5)) / 8 * 1e9 * LINK_EFFICIENCY)
    return min(links) if links else math.inf


def _node_link(hw: HardwareConfig, spec: dict | None) -> float:
    """The catalog's link between the GPUs of one node, bytes/s."""
    if spec is None:
        return 5e9  # gloo over shared memory
    if hw.interconnect == "nvlink" and spec.get("nvlink_gbs"):
        gbs = spec["nvlink_gbs"] / 2  # the catalog counts both directions
    else:  # without peer-to-peer, NCCL bounces through host memory
        gbs = pcie_gbs(spec) * (0.5 if str(hw.env.get("NCCL_P2P_DISABLE")) == "1" else 1)
    return gbs * 1e9 * LINK_EFFICIENCY


def _latency(cfg: RunConfig) -> float:
    hw = cfg.hardware
    if hw.num_nodes > 1:
        return COLLECTIVE_LATENCY_S["network"]
    return COLLECTIVE_LATENCY_S["nvlink" if hw.interconnect == "nvlink" else "pcie"] if devices_per_node(hw) > 1 else 0.0


def flops_per_token(shape: Shape, seq_len: int) -> float:
    """model.flops_per_token (6 x active parameters + attention), cached: it walks every parameter."""
    from dsrun.model import flops_per_token as count

    if ("flops", seq_len) not in shape.cache:
        shape.cache["flops", seq_len] = count(shape.model, seq_len)
    return shape.cache["flops", seq_len]


def training_speed(cfg: RunConfig, shape: Shape, spec: dict | None, m: dict, host: dict) -> dict[str, float]:
    tr, run_by, d = cfg.train, STRATEGIES[cfg.parallel.strategy], dtypes(cfg)
    lora = cfg.adapter.method == "lora"
    # forward 2, input gradients 2, weight gradients 2 (none for frozen weights), recomputed forward 2
    # task=dpo/grpo under LoRA: the reference's forward (adapters off) beside each step, 2 more
    reference = 2 if lora and (preference_pairs(cfg) or group_rollouts(cfg)) else 0
    passes = 4 + (0 if lora else 2) + (2 if cfg.parallel.activation_checkpointing else 0) + reference
    assert tr.seq_len is not None  # resolve() fills it
    flops = flops_per_token(shape, tr.seq_len) * passes / 6
    tokens = global_batch(cfg) * tr.seq_len * sequences_per_row(cfg)
    world, n = world_size(cfg), data_parallel_size(cfg)
    rate, mfu = _rate(cfg, spec, shape)
    share = 0.0  # routed experts run in fp32 under autocast (transformers casts their input to the weights' dtype)
    if d.autocast and shape.routed and spec is not None:
        config = shape.model.config
        share = shape.routed * config.num_experts_per_tok / config.n_routed_experts / shape.active
    compute = tokens * flops / world * ((1 - share) / rate + share / _rate(cfg, spec, shape, "32-true")[0])

    bandwidth, ring = _bandwidth(cfg, spec), (n - 1) / n
    trainable_bytes = (lora_sizes(cfg, shape)[0] if lora else shape.total) * bytes_per_param(cfg)["gradients"]
    if run_by.all_reduces:
        overlapped = all_reduce_seconds(trainable_bytes, n, bandwidth)
    elif gathers(cfg):  # weights all-gathered for forward and backward of every micro-batch, gradients
        # reduce-scattered once
        gathered = gather_bytes(cfg, shape.total, shape.matmul if cfg.quant.method != "none" else 0)
        overlapped = ring * (2 * tr.accumulation * gathered + trainable_bytes) / bandwidth
    elif run_by.zero:  # ZeRO-1/2: gradients reduce-scattered per micro-batch, weights gathered after the step
        overlapped = ring * (tr.accumulation + 1) * trainable_bytes / bandwidth
    else:
        overlapped = 0.0
    blocking = 0.0
    if run_by.tensor_parallel and cfg.parallel.tensor_parallel_size > 1:  # 4 activation all-reduces per block
        t = cfg.parallel.tensor_parallel_size
        config = shape.model.config
        blocking += 4 * config.num_hidden_layers * 2 * (t - 1) / t * tr.micro_batch * tr.seq_len * \
            config.hidden_size * d.compute * tr.accumulation / bandwidth
    # offloaded block inputs (activation_offload.py) copy on the compute stream at PCIe speed behind tens of ms of
    # block compute, and an embedding in host memory sends only a batch's rows (14 MiB per 2,048 tokens of a 7B):
    # not counted
    host = {k: v for k, v in host.items() if k not in ("activations", "embedding")}
    if host and spec:  # offloaded weights come in per micro-batch, gradients go out once, the host runs the optimizer
        per_process = {k: v / devices_per_node(cfg.hardware) for k, v in host.items()}
        link = pcie_gbs(spec) * 1e9 * LINK_EFFICIENCY
        blocking += (2 * tr.accumulation * per_process.get("weights", 0) + per_process.get("gradients", 0)) / link
        b = bytes_per_param(cfg)
        blocking += (lora_sizes(cfg, shape)[0] if lora else shape.total) / shard_counts(cfg)["optimizer"] * \
            (b["weights"] + b["gradients"] + b["optimizer"]) / strategy(cfg).host_optimizer_bytes_per_s
    gpu = compute + max(0.0, overlapped - 2 / 3 * compute)  # collectives hide under backward
    step = max(gpu, host_time(cfg, shape, spec)) + optimizer_time(cfg, shape, spec, host) + blocking
    return {"flops_per_token": flops, "step_time_s": step, "tokens_per_s": tokens / step, "mfu": mfu}


def host_time(cfg: RunConfig, shape: Shape, spec: dict | None) -> float:
    """Seconds the host spends issuing one optimizer step's forward passes (backward runs in autograd's C++ engine):
    the GPU cannot go faster than it is fed, which decides small micro-batches."""
    if spec is None:
        return 0.0
    d, lora = dtypes(cfg), cfg.adapter.method == "lora"
    per_block = [HOST_BLOCK_FORWARD_S * (HOST_AUTOCAST_FACTOR if d.autocast else 1) * (HOST_MOE_FACTOR if moe else 1)
                 + (HOST_LORA_BLOCK_S if lora else 0) for moe in shape.moe_blocks]
    passes = 2 if cfg.parallel.activation_checkpointing else 1  # checkpointing runs each forward again
    return sum(per_block) * passes * cfg.train.accumulation * (HOST_COMPILED_FACTOR if cfg.train.compile else 1)


def optimizer_time(cfg: RunConfig, shape: Shape, spec: dict | None, host: dict) -> float:
    """The optimizer step, gradient norm and clipping stream every local trainable parameter through HBM: Adam reads
    and writes weights and states; the gradients are read by the norm and by fused AdamW, which also clips, or
    (fp16's scaler, DeepSpeed, SGD) read three times and written once (host-side optimizers are counted with the
    offload)."""
    if spec is None or "optimizer_states" in host:
        return 0.0
    b, div = bytes_per_param(cfg), shard_counts(cfg)
    trainable = lora_sizes(cfg, shape)[0] if cfg.adapter.method == "lora" else shape.total
    clips_in_kernel = (cfg.optim.name == "adamw" and not PRECISIONS[cfg.precision.mode].loss_scaling
                       and not STRATEGIES[cfg.parallel.strategy].zero)  # strategy.optimizer_step
    per_param = 2 * (b["weights"] + b["optimizer"]) + (2 if clips_in_kernel else 4) * b["gradients"]
    return trainable / div["optimizer"] * per_param / (spec["mem_bandwidth_gbs"] * 1e9 * STEP_BANDWIDTH_EFFICIENCY)


def inference_speed(cfg: RunConfig, shape: Shape, spec: dict | None, m: dict, host: dict) -> dict[str, float]:
    config, pl, n = shape.model.config, cfg.plan, world_size(cfg)
    per_weight = (m["weights"] + host.get("weights", 0) / devices_per_node(cfg.hardware)) * n / shape.total
    touched = 1.0  # share of the routed experts a decode step reads: any chosen by one of the batch's tokens
    if shape.routed:
        touched = 1 - (1 - config.num_experts_per_tok / config.n_routed_experts) ** pl.batch
    read = per_weight * (shape.total - shape.routed * (1 - touched)) + m["kv_cache"] * n
    bandwidth = (spec["mem_bandwidth_gbs"] if spec else CPU_MEMORY_GBS) * 1e9 * DECODE_BANDWIDTH_EFFICIENCY
    rate, mfu = _rate(cfg, spec, shape)
    forward = flops_per_token(shape, pl.context) / 3  # 2 x active params + attention over the context
    streamed = host.get("weights", 0) / devices_per_node(cfg.hardware) / (pcie_gbs(spec) * 1e9 * LINK_EFFICIENCY) if host and spec else 0
    step = max(read / (n * bandwidth), pl.batch * forward / (n * rate)) + streamed + \
        2 * config.num_hidden_layers * _latency(cfg)
    first = pl.batch * pl.context * forward / (n * rate) + streamed
    return {"flops_per_token": forward, "step_time_s": step, "tokens_per_s": pl.batch / step,
            "time_to_first_token_s": first, "mfu": mfu}


def cost(cfg: RunConfig, spec: dict | None, tokens_per_s: float) -> tuple[float, float | None, dict[str, float], float]:
    """(hours, USD per 1M tokens, USD per hour by item, hardware USD)."""
    hours = 1e6 / tokens_per_s / 3600
    if spec is None:
        return hours, None, {}, 0.0
    cards = world_size(cfg)
    price = cards * (cfg.plan.gpu_price_usd or spec["price_usd"])
    per_hour = {"amortisation": price / (cfg.plan.lifetime_years * 8766),
                "electricity": cards * spec["tdp_w"] * HOST_POWER_FACTOR / 1000 * cfg.plan.electricity_usd_per_kwh}
    return hours, hours * sum(per_hour.values()), per_hour, price
