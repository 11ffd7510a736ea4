"""`task=plan`: the plan as rich tables for people, or as JSON (`plan.json=true`) for sweeps and tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.table import Table

from dsrun.plan import Plan
from dsrun.plan.search import with_suggestions

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

LABELS = {
    "weights": "weights",
    "quant_constants": "quantization constants",
    "compute_copy": "autocast weight copies (bf16, kept for backward)",
    "gathered": "gathered weights + unsharded grads (FSDP / ZeRO-3)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "lora": "LoRA adapters (weights, gradients, states)",
    "comm_buffers": "ZeRO communication buckets",
    "activations": "activations saved for backward",
    "logits_loss": "logits + fp32 loss buffers",
    "rollout_kv_cache": "rollout engine KV cache (task=grpo)",
    "backward_overlap": "gradients reuse freed activations",
    "kv_cache": "KV cache",
    "working_set": "prefill working set + last logits",
    "cuda_context": "CUDA context + NCCL",
    "allocator": "allocator fragmentation",
    "embedding": "input embedding (parallel.offload_embedding)",
}


def plan_task(cfg: RunConfig) -> Plan:
    """Print the plan and keep it as plan.json in the run folder (a sweep's trials each leave one)."""
    from hydra.core.hydra_config import HydraConfig

    result = with_suggestions(cfg)
    text = json.dumps(result.to_dict(), indent=1)
    if HydraConfig.initialized():
        (Path(HydraConfig.get().runtime.output_dir) / "plan.json").write_text(text + "\n")
    if cfg.plan.json:
        print(text)
    else:
        render(result, Console(width=None if sys.stdout.isatty() else 120))
    return result


def render(p: Plan, console: Console) -> None:
    r = p.recipe
    console.print(f"[bold]dsrun plan[/]: {'train' if p.mode == 'train' else 'inference of'} {r['model']} on "
                  f"{p.device}", soft_wrap=True)
    console.print(_recipe_line(p), soft_wrap=True)
    n = p.parameters
    console.print(f"{n['total'] / 1e9:,.2f} B parameters ({n['trainable'] / 1e9:,.3g} B trainable, "
                  f"{n['active'] / 1e9:,.2f} B active per token); {p.flops_per_token / 1e9:,.1f} GFLOP per token",
                  soft_wrap=True)
    console.print(_memory_table(p))
    console.print(_speed_table(p))
    colour = "green" if p.fits else "red"
    console.print(f"[bold {colour}]{p.verdict}[/]", soft_wrap=True)
    if p.suggestions:
        console.print(_suggestion_table(p))
        _summary(p, console)
    console.print("[dim]assumptions: " + "; ".join(p.assumptions) + " (docs/planner.md)[/]")


def _recipe_line(p: Plan) -> str:
    r = p.recipe
    parts = [f"parallel {r['parallel']} ({r['strategy']}{', offload' if r['offload'] else ''}"
             f"{', activation checkpointing' if r['activation_checkpointing'] else ''})", f"precision {r['precision']}"]
    if r["quant"] != "none" or r["adapter"] != "none":
        parts.append(f"quant {r['quant']}, adapter {r['adapter']}")
    if p.mode != "inference":
        parts.append(f"micro-batch {r['micro_batch']} x accumulation {r['accumulation']} -> global batch "
                     f"{r['global_batch']} x seq {r['seq_len']}")
    else:
        parts.append(f"{r['batch']} sequence(s) x {r['context']:,} tokens of context")
    return "; ".join(parts)


def _memory_table(p: Plan) -> Table:
    where = "GiB per GPU" if p.recipe["gpu"] else "GiB per process"
    table = Table(title="memory at the peak", title_justify="left")
    table.add_column("component")
    table.add_column(where, justify="right")
    for key, gib in p.components.items():
        if abs(gib) >= 0.005:
            table.add_row(LABELS.get(key, key), f"{gib:,.2f}")
    table.add_section()
    table.add_row("[bold]total", f"[bold]{p.total_gib:,.2f}")
    table.add_row("capacity", f"{p.vram_gib:,.1f}")
    for key, gib in p.host_components.items():
        table.add_row(f"host RAM per node: {LABELS.get(key, key)}", f"{gib:,.2f}")
    return table


def _speed_table(p: Plan) -> Table:
    table = Table(title="speed and cost", title_justify="left", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    unit = "tokens/s" if p.mode != "inference" else "decoded tokens/s, whole batch (bandwidth bound)"
    table.add_row(unit, f"{p.tokens_per_s:,.0f}")
    table.add_row("optimizer step" if p.mode != "inference" else "decode step", f"{p.step_time_s:,.3g} s")
    if p.time_to_first_token_s is not None:
        table.add_row("time to first token (prompt = context)", f"{p.time_to_first_token_s:,.3g} s")
    table.add_row("assumed MFU", f"{p.mfu:.0%}")
    table.add_row("time per 1M tokens", f"{p.hours_per_million_tokens:,.2f} h")
    if p.usd_per_million_tokens is not None:
        items = ", ".join(f"{k} ${v:,.2f}/h" for k, v in p.usd_per_hour.items())
        table.add_row("cost per 1M tokens", f"${p.usd_per_million_tokens:,.2f} ({items})")
        table.add_row("hardware", f"${p.hardware_usd:,.0f}")
    return table


def _suggestion_table(p: Plan) -> Table:
    table = Table(title="changes that make it fit, each planned again (cheapest first)", title_justify="left")
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("#", "right"), ("change [dim](overrides)", "left"), ("GiB/GPU", "right"), ("tokens/s", "right"),
        ("$/1M tok", "right"), ("to buy", "right"), ("note", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for i, s in enumerate(p.suggestions, 1):
        note = "" if s.fits else "[red]still does not fit[/]"
        if s.host_gib:
            note += f" {s.host_gib:,.0f} GiB host RAM per node"
        if s.pending:
            note += f" [yellow]lands with {s.pending}[/]"
        usd = f"{s.usd_per_million_tokens:,.2f}" if s.usd_per_million_tokens is not None else "-"
        table.add_row(str(i), f"{s.change}\n[dim]{' '.join(s.overrides)}[/]", f"{s.total_gib:,.1f}",
                      f"{s.tokens_per_s:,.0f}", usd, f"${s.hardware_usd:,.0f}" if s.hardware_usd else "-", note.strip())
    return table


def _summary(p: Plan, console: Console) -> None:
    """The answer in sentences: what holds it, and what offload would need."""
    fitting = [s for s in p.suggestions if s.fits]
    software = [s for s in fitting if not s.hardware_usd and not s.pending]
    hardware = [s for s in fitting if s.hardware_usd]
    full = [s for s in software if not any(o.startswith(("adapter=", "quant=")) for o in s.overrides)]
    for label, found in (("cheapest fix on this hardware", software), ("keeping every weight trainable", full)):
        if found and (label.startswith("cheapest") or found[0] is not software[0]):
            console.print(f"{label}: {found[0].change} ({' '.join(found[0].overrides)})", soft_wrap=True)
    if not any(s.fits and not s.hardware_usd for s in p.suggestions):
        console.print("no change of settings makes it fit on this hardware", soft_wrap=True)
    if not hardware:
        console.print("no catalog GPU holds it in up to 64 cards", soft_wrap=True)
    for s in hardware:
        console.print(f"holds it: {s.change}, ${s.hardware_usd:,.0f} of new cards, {s.total_gib:,.1f} GiB per GPU "
                      f"({' '.join(s.overrides)})", soft_wrap=True)
    for s in p.suggestions:
        if any("offload" in o for o in s.overrides):
            verdict = "fits" if s.fits else "does not fit either"
            console.print(f"offload ({' '.join(s.overrides)}): {s.total_gib:,.1f} GiB per GPU + {s.host_gib:,.0f} GiB "
                          f"of host RAM per node; {verdict}", soft_wrap=True)
