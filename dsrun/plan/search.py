"""What makes a recipe fit: each cheap change applied to a copy of the config and planned again (dsrun/plan/).

Software changes come first (micro-batch and accumulation at the same global batch, activation checkpointing,
bf16 states, sharding, offload, LoRA / QLoRA), then hardware: for every catalog GPU the fewest cards that hold the
recipe. A change that still does not fit is tried with the cheap knobs on top before it is given up.
"""

from __future__ import annotations

import functools
import math

import yaml

from dsrun.batch import data_parallel_size, global_batch, world_size
from dsrun.config import PENDING, selected, validate
from dsrun.schema import RunConfig
from dsrun.constants import CONF_DIR
from dsrun.errors import ConfigError
from dsrun.hardware import gpu_catalog
from dsrun.plan import Plan, Suggestion, plan
from dsrun.plan.assumptions import GIB
from dsrun.plan.overrides import apply_overrides, boxed
from dsrun.plan.shape import model_shape
from dsrun.precision import PRECISIONS
from dsrun.quantize import QUANT_METHODS
from dsrun.strategy import STRATEGIES
from dsrun.task_table import RUNNABLE_TASKS


CARD_COUNTS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CARDS_PER_NODE = {"consumer": 4, "datacenter": 8}  # 4-card consumer boxes; HGX boards of 8
SHOWN_HARDWARE = 4  # hardware suggestions kept, cheapest per token first


def with_suggestions(cfg: RunConfig) -> Plan:
    """The plan, and when it does not fit, the changes that make it fit, each planned again."""
    result = plan(cfg)
    if not result.fits:
        result.suggestions = suggestions(boxed(cfg))
    return result


def suggestions(cfg: RunConfig) -> list[Suggestion]:
    """Ranked: fits before does-not-fit, no purchase before a purchase, then cost (or time) per 1M tokens."""
    found = [s for change, overrides in _software_changes(cfg) if (s := _fit(cfg, change, overrides))]
    # a change that still does not fit is worth showing only for offload: what host RAM and card it would need
    found = [s for s in found if s.fits or any("offload" in o for o in s.overrides)]
    tiers = {gpu: s for gpu in gpu_catalog() if (s := _fewest_cards(cfg, gpu))}
    found += sorted(tiers.values(), key=_rank)[:SHOWN_HARDWARE]
    if cfg.hardware.gpu in tiers:  # more of the cards you have, however it ranks
        found.append(tiers[cfg.hardware.gpu])
    unique = {tuple(s.overrides): s for s in found}
    return sorted(unique.values(), key=lambda s: (not s.fits, s.hardware_usd > 0, _rank(s)))


def _rank(s: Suggestion) -> float:
    return s.usd_per_million_tokens if s.usd_per_million_tokens is not None else 1e6 / s.tokens_per_s


def _software_changes(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """(what, overrides) of each change that keeps the hardware; the cheap knobs are added by _fit."""
    cuda, par = cfg.hardware.accelerator == "cuda", cfg.parallel
    inference = cfg.plan.mode == "inference"
    keep = ["parallel.activation_checkpointing=true"] if par.activation_checkpointing else []
    changes: list[tuple[str, list[str]]] = [("keep the recipe", [])]
    if inference:
        if not PRECISIONS[cfg.precision.mode].fp8 and cfg.quant.method == "none":
            changes.append(("fp8 weights with block scales (DeepSeek's own checkpoint format)", ["precision=fp8"]))
        changes += [(f"{q} weights", [f"quant={q}"]) for q in ("int8", "nf4") if cfg.quant.method != q]
        if cuda and not par.offload:
            changes.append(("weights that do not fit stay in host RAM (device_map=auto)", ["parallel.offload=true"]))
        return changes
    if PRECISIONS[cfg.precision.mode].casts_weights and not STRATEGIES[par.strategy].zero:
        changes.append(("bf16 weights and optimizer states (half the bytes, less exact updates)",
                        ["precision=bf16_true"]))
    if world_size(cfg) > 1 and STRATEGIES[par.strategy].whole_model:
        changes.append(("shard weights, gradients and states (FSDP2)", ["parallel=fsdp", *keep]))
        if cuda:
            changes.append(("shard gradients and states (ZeRO-2)", ["parallel=zero2", *keep]))
            changes.append(("shard weights, gradients and states (ZeRO-3)", ["parallel=zero3", *keep]))
    if cuda and not par.offload:
        changes.append(("ZeRO-3, states and weights in host RAM", ["parallel=zero3_offload", *keep]))
        changes.append(("FSDP2, states and weights in host RAM", ["parallel=fsdp", "parallel.offload=true", *keep]))
    if cfg.adapter.method == "none":
        changes.append(("train LoRA adapters on frozen weights", ["adapter=lora"]))
        changes += [(f"QLoRA: {q} frozen weights + LoRA", [f"quant={q}", "adapter=lora"]) for q in ("int8", "nf4")]
    return changes


def _knobs(cfg: RunConfig) -> list[list[str]]:
    """The cheap knobs, cheapest first: smaller micro-batches at the same global batch (no extra compute), then
    activation checkpointing (a third more compute); for inference, smaller batches."""
    if cfg.plan.mode == "inference":
        batches, b = [], cfg.plan.batch
        while b > 1:
            b //= 2
            batches.append([f"plan.batch={b}"])
        return [[], *batches]
    micro, accumulation = cfg.train.micro_batch, cfg.train.accumulation
    smaller = [[f"train.micro_batch={m}", f"train.accumulation={accumulation * micro // m}"]
               for m in range(micro - 1, 0, -1) if micro % m == 0]
    if cfg.parallel.activation_checkpointing:
        return [[], *smaller]
    return [[], *smaller, *[["parallel.activation_checkpointing=true", *k] for k in [[], *smaller]]]


def _fit(cfg: RunConfig, change: str, overrides: list[str], hardware_usd: float = 0.0) -> Suggestion | None:
    """The change with the first knobs that make it fit; else its last try (to show what it would need), or None
    when no try is valid or there is nothing to show."""
    changed = apply_overrides(cfg, overrides)
    last = None
    for knobs in _knobs(changed):
        if not (overrides or knobs):
            continue  # the recipe as it is: already planned
        candidate = apply_overrides(changed, knobs)
        try:
            validate(candidate, gpu_catalog())
        except ConfigError:
            continue
        p = plan(candidate)
        last = _suggestion(change, _merged(overrides, knobs), p, candidate, hardware_usd)
        if p.fits:
            return last
    return last if overrides else None


def _merged(overrides: list[str], knobs: list[str]) -> list[str]:
    """overrides then knobs, a key the knobs set again given once (its last value), as a command line would apply
    them: a suggestion is copied to one."""
    merged: dict[str, str] = {}
    for item in overrides + knobs:
        key = item.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = item
    return list(merged.values())


def _suggestion(change: str, overrides: list[str], p: Plan, cfg: RunConfig, hardware_usd: float) -> Suggestion:
    described = [change] if change != "keep the recipe" or not overrides else []
    for item in overrides:
        if item.startswith("train.micro_batch="):
            described.append(f"micro-batch {cfg.train.micro_batch} x accumulation {cfg.train.accumulation} "
                             f"(global batch {global_batch(cfg)})")
        elif item == "parallel.activation_checkpointing=true" and "activation checkpointing" not in described:
            described.append("activation checkpointing")
        elif item.startswith("plan.batch="):
            described.append(f"{cfg.plan.batch} sequences at a time")
    pending = [issue for (group, option), issue in PENDING.items() if group != "task" and selected(cfg, group, option)]
    return Suggestion(change=", ".join(dict.fromkeys(described)), overrides=overrides, fits=p.fits,
                      total_gib=p.total_gib, vram_gib=p.vram_gib, host_gib=p.host_gib, tokens_per_s=p.tokens_per_s,
                      usd_per_million_tokens=p.usd_per_million_tokens, hardware_usd=hardware_usd,
                      pending=pending[0] if pending and cfg.task.name not in RUNNABLE_TASKS else None)


def _fewest_cards(cfg: RunConfig, gpu: str) -> Suggestion | None:
    """The fewest cards of `gpu` (in CARD_COUNTS) that hold the recipe, sharded when there are several."""
    spec, here = gpu_catalog()[gpu], cfg.hardware
    for n in CARD_COUNTS:
        if gpu == here.gpu and n <= world_size(cfg) or (spec["vram_gib"] * n < 0.5 * _floor_gib(cfg)):
            continue
        nodes = math.ceil(n / CARDS_PER_NODE[spec["class"]])
        if n % nodes:
            continue
        overrides = _hardware_overrides(cfg, gpu, n // nodes, nodes)
        name = f"{n} x {spec['name']}"
        price = cfg.plan.gpu_price_usd if gpu == here.gpu and cfg.plan.gpu_price_usd else spec["price_usd"]
        owned = world_size(cfg) if gpu == here.gpu else 0  # cards you have count as paid for
        s = _fit(cfg, name, overrides, (n - owned) * price)
        if s and s.fits:
            return s
    return None


def _floor_gib(cfg: RunConfig) -> float:
    """A lower bound of what any card count must hold in total (weights alone, as quantized), to skip hopeless
    counts quickly."""
    shape = model_shape(cfg.model)
    method = QUANT_METHODS[cfg.quant.method]
    bytes_per_weight = method.weight_bytes if method is not None else 2.0
    return shape.total * bytes_per_weight / GIB


def _hardware_overrides(cfg: RunConfig, gpu: str, devices: int, nodes: int) -> list[str]:
    """A hardware option of conf/ when one matches, else the fields that differ from the current one."""
    spec, here = gpu_catalog()[gpu], cfg.hardware
    named = [o for o, h in _hardware_options().items()
             if (h["gpu"], h["devices"], h["num_nodes"]) == (gpu, devices, nodes)]
    if named:
        hardware = [f"hardware={named[0]}"]
    else:
        datacenter = spec["class"] == "datacenter"
        link = ("nvlink" if datacenter and spec["nvlink_gbs"] else "pcie") if devices > 1 else "none"
        wanted = {"accelerator": "cuda", "gpu": gpu, "devices": devices, "num_nodes": nodes, "interconnect": link,
                  "network": ("infiniband" if datacenter else "ethernet") if nodes > 1 else "none"}
        hardware = [f"hardware.{k}={v}" for k, v in wanted.items() if getattr(here, k) != v]
    if gpu != here.gpu and cfg.plan.gpu_price_usd:
        hardware.append("plan.gpu_price_usd=null")
    extra = []
    if cfg.precision.name == "auto" and PRECISIONS[cfg.precision.mode].compute == "float32":  # auto: bf16 on GPUs
        extra.append("precision=bf16")
    n = devices * nodes
    if n > 1 and STRATEGIES[cfg.parallel.strategy].whole_model and cfg.plan.mode != "inference":
        extra.append("parallel=fsdp")
        if cfg.parallel.activation_checkpointing:
            extra.append("parallel.activation_checkpointing=true")
    if cfg.plan.mode != "inference":
        extra += _same_global_batch(cfg, data_parallel_size(apply_overrides(cfg, hardware + extra)))
    return hardware + extra


def _same_global_batch(cfg: RunConfig, ranks: int) -> list[str]:
    """Micro-batch and accumulation that keep the global batch over `ranks` data-parallel ranks (the largest
    micro-batch up to today's), or nothing when it does not divide."""
    target, micro = global_batch(cfg), cfg.train.micro_batch
    for m in range(micro, 0, -1):
        if target % (m * ranks) == 0:
            changed = [f"train.micro_batch={m}"] if m != micro else []
            accumulation = target // (m * ranks)
            return changed + ([f"train.accumulation={accumulation}"] if accumulation != cfg.train.accumulation else [])
    return []


@functools.cache
def _hardware_options() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF_DIR / "hardware").glob("*.yaml"))
            if p.stem not in ("auto", "cpu")}
