"""Fit before you buy: a recipe's per-GPU memory, speed and cost, from its config alone, on any machine.

`plan(cfg) -> Plan` sits on top of its parts: assumptions (the constants), overrides (the config as plain data),
shape (the model, counted exactly on the meta device), memory (what one step holds at its peak, the start of
backward, sharded the way the strategy shards it), speed (FLOPs over an assumed fraction of the card's dense tensor
rate plus the communication the strategy cannot hide; cost is hardware amortisation plus electricity). Above it,
search.py applies each cheap change to a copy of the config and plans it again, when a caller asks; report.py
prints. docs/planner.md derives every term and its assumptions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dsrun.batch import global_batch, world_size
from dsrun.errors import UserError
from dsrun.hardware import cpu_cores, devices_per_node, gpu_catalog, host_memory_gib, measured_path
from dsrun.plan.assumptions import CPU_FLOPS_PER_CORE, CPU_MFU, FP8_EFFICIENCY, GIB, HOST_POWER_FACTOR, MFU, MOE_EFFICIENCY
from dsrun.plan.memory import inference_memory, lora_sizes, training_memory
from dsrun.plan.overrides import boxed
from dsrun.plan.shape import model_shape
from dsrun.precision import PRECISIONS
from dsrun.plan.speed import cost, inference_speed, measured_bandwidth, training_speed
from dsrun.quantize import QUANT_METHODS

if TYPE_CHECKING:
    from dsrun.schema import RunConfig


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


def gpu_spec(cfg: RunConfig) -> dict | None:
    """The catalog entry of the planned GPU; None for CPU plans."""
    hw = cfg.hardware
    if hw.accelerator == "cpu":
        return None
    if hw.gpu not in gpu_catalog():
        raise UserError(f"hardware.gpu={hw.gpu}: the plan needs a GPU from the catalog "
                        f"({', '.join(sorted(gpu_catalog()))}); set hardware.gpu=<one of them>")
    return gpu_catalog()[hw.gpu]


def plan(cfg: RunConfig) -> Plan:
    """Memory, speed and cost of a composed, resolved, validated config (a DictConfig, dict or Box). The changes
    that make a plan fit are the caller's to ask for (dsrun.plan.search.with_suggestions)."""
    cfg = boxed(cfg)
    spec, shape = gpu_spec(cfg), model_shape(cfg.model)
    inference = cfg.plan.mode == "inference"
    m, host = (inference_memory if inference else training_memory)(cfg, shape, spec)
    speed = (inference_speed if inference else training_speed)(cfg, shape, spec, m, host)
    hours, usd, per_hour, price = cost(cfg, spec, speed["tokens_per_s"])
    capacity = spec["vram_gib"] if spec else host_memory_gib() / devices_per_node(cfg.hardware)
    if cfg.hardware.memory_cap_gib:
        capacity = min(capacity, cfg.hardware.memory_cap_gib)
    total, host_total = sum(m.values()) / GIB, sum(host.values()) / GIB
    fits = total <= capacity and (cfg.plan.host_ram_gib is None or host_total <= cfg.plan.host_ram_gib)
    device = f"{world_size(cfg)} x {spec['name']}" if spec else f"{devices_per_node(cfg.hardware)} x CPU process"
    result = Plan(
        mode=cfg.plan.mode, fits=fits, total_gib=total, vram_gib=capacity,
        components={k: v / GIB for k, v in m.items()}, host_gib=host_total,
        host_components={k: v / GIB for k, v in host.items()}, tokens_per_s=speed["tokens_per_s"],
        step_time_s=speed["step_time_s"], time_to_first_token_s=speed.get("time_to_first_token_s"),
        mfu=speed["mfu"], hours_per_million_tokens=hours, usd_per_million_tokens=usd, usd_per_hour=per_hour,
        hardware_usd=price, device=device, recipe=_recipe(cfg),
        parameters={"total": shape.total, "trainable": lora_sizes(cfg, shape)[0] or (0 if inference else shape.total),
                    "active": shape.active, "embedding": shape.embedding},
        flops_per_token=speed["flops_per_token"], verdict="", assumptions=assumptions(cfg, spec))
    result.verdict = _verdict(result, cfg, spec)
    return result


def _recipe(cfg: RunConfig) -> dict[str, Any]:
    recipe = {"model": cfg.model.name, "hardware": cfg.hardware.name, "gpu": cfg.hardware.gpu,
              "devices": devices_per_node(cfg.hardware), "num_nodes": cfg.hardware.num_nodes,
              "parallel": cfg.parallel.name, "strategy": cfg.parallel.strategy, "zero_stage": cfg.parallel.zero_stage,
              "offload": cfg.parallel.offload, "activation_checkpointing": cfg.parallel.activation_checkpointing,
              "precision": cfg.precision.mode, "quant": cfg.quant.method, "adapter": cfg.adapter.method}
    if cfg.plan.mode == "inference":
        return {**recipe, "context": cfg.plan.context, "batch": cfg.plan.batch}
    tr = cfg.train
    return {**recipe, "micro_batch": tr.micro_batch, "accumulation": tr.accumulation, "seq_len": tr.seq_len,
            "global_batch": global_batch(cfg), "optimizer": cfg.optim.name}


def _verdict(p: Plan, cfg: RunConfig, spec: dict | None) -> str:
    where = "per GPU" if spec else "of host RAM per process"
    cap = cfg.hardware.memory_cap_gib
    capped = cap is not None and cap <= p.vram_gib
    has = (f"hardware.memory_cap_gib caps it at {p.vram_gib:.1f} GiB" if capped else
           f"{spec['name'] if spec else 'this machine'} has {p.vram_gib:.1f} GiB")
    if not p.fits and p.total_gib > p.vram_gib:
        weights = sum(p.components.get(k, 0) + p.host_components.get(k, 0) / devices_per_node(cfg.hardware)
                      for k in ("weights", "quant_constants"))
        return (f"does not fit: needs {p.total_gib:,.1f} GiB {where}, {has} ({p.total_gib / p.vram_gib:.1f}x); "
                f"the weights alone take {weights:,.1f} GiB {where}")
    if not p.fits:
        return f"does not fit: needs {p.host_gib:,.1f} GiB of host RAM per node, plan.host_ram_gib is " \
               f"{cfg.plan.host_ram_gib:,.1f}"
    share = p.total_gib / p.vram_gib
    tight = "; above 90 %: little room for fragmentation spikes" if share > 0.9 else ""
    return f"fits: {p.total_gib:,.1f} of {p.vram_gib:.1f} GiB {where} ({share:.0%}){tight}"


def assumptions(cfg: RunConfig, spec: dict | None) -> list[str]:
    pl = cfg.plan
    rate = {"fp32_tflops": "fp32 CUDA-core", "fp8_tflops": "fp8 tensor"}.get(PRECISIONS[cfg.precision.mode].peak,
                                                                             "bf16/fp16 tensor")
    items = [f"MFU {pl.mfu or (MFU[spec['class']] if spec else CPU_MFU):.0%} of the "
             + (f"dense {rate} rate" if spec else "CPU's fp32 peak")
             + (f" ({spec['class']} GPUs)" if spec and not pl.mfu else "")
             + f"; x{MOE_EFFICIENCY} for MoE, " + " / ".join(f"x{m.compute_efficiency} {name}" for name, m in
                                                          QUANT_METHODS.items() if m is not None)
             + f", fp8 at {FP8_EFFICIENCY} of its peak's share"]
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
    if cfg.plan.mode != "inference":
        items.append("peak at the start of backward; gradients reuse freed activations when accumulation is 1")
    if cfg.plan.mode == "dpo":
        items.append("task=dpo: each row a pair (2 sequences); under LoRA the reference is the model with its "
                     "adapters off, one more forward without gradients; without adapters its log-probabilities are "
                     "computed before the first step")
    elif cfg.plan.mode == "grpo":
        items.append(f"task=grpo: each row a prompt with its {cfg.plan.generations} completions (plan.generations), "
                     "each as long as train.seq_len at most; the rollout engine's KV cache holds all of an optimizer "
                     "step's (micro_batch x accumulation prompts); under LoRA the reference is the model with its "
                     "adapters off, one more forward without gradients; the rollouts' decode time is not in the speed")
    else:
        items.append("weights and KV cache split evenly over the GPUs (tensor parallel); decode reads every "
                     "weight once per step at 70 % of the memory bandwidth")
    return items
