"""Training speed side by side, in one process on one device: the plain loop a user writes by hand (transformers
model, bf16 autocast, fused AdamW, SDPA, the model's own loss; eager and `torch.compile(model)`) and dsrun's
optimizer step (`dsrun.train.setup` + `train_step`, eager and `train.compile=true`), for the same model, init,
batches, batch and sequence. Each case: warm-up steps, then `--repeats` timed windows of `--steps` steps, the
device synchronised around each; the median window counts. The math is made the same for the loss comparison:
constant learning rate, no clipping, torch's AdamW defaults, in both.

    python bench/speed.py                                        # R1-Distill-Qwen-1.5B shape, seq 2048, mb 4
    python bench/speed.py --model deepseek_v2_lite --set model.fields.num_hidden_layers=4 --batch 2
    python bench/speed.py --device cpu --model tiny_qwen2 --batch 2 --seq 32 --steps 2 --cases plain,dsrun

MFU = tokens/s x (6 x non-embedding active params + 12 x layers x hidden x seq) / the device's bf16 peak (the
catalog's; 989 TFLOP/s for H100/H200). Writes $OUT/speed.json; prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = ("plain", "plain_compile", "dsrun", "dsrun_compile")  # name: loop, and "_compile" compiles it
LR = 1e-5


def compose(args: argparse.Namespace, compiled: bool) -> Any:
    """The dsrun config of the job, resolved and validated as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dsrun.config import validate
    from dsrun.schema import register_configs
    from dsrun.constants import CONF_DIR
    from dsrun.hardware import gpu_catalog
    from dsrun.resolve import resolve

    cuda = args.device == "cuda"
    overrides = [f"model={args.model}", "data=synthetic_tokens", f"data.num_samples={args.batch * 64}",
                 f"train.seq_len={args.seq}", f"train.micro_batch={args.batch}", "train.accumulation=1",
                 f"precision={'bf16' if cuda else 'fp32'}", f"hardware={'auto' if cuda else 'cpu'}",
                 *(["hardware.devices=1"] if cuda else []), "parallel=single", "monitor=none",
                 "train.checkpoint_every=-1", f"train.compile={str(compiled).lower()}", f"train.lr={LR}",
                 "optim.warmup_steps=0", "optim.schedule=constant", "optim.grad_clip=0", "optim.betas=[0.9,0.999]",
                 "optim.weight_decay=0.01", f"train.max_steps={args.warmup + args.steps * args.repeats}", *args.set]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    resolve(cfg)
    validate(cfg, gpu_catalog())
    return cfg


def timed(step: Callable[[], Any], device: Any, warmup: int, steps: int, repeats: int) -> tuple[list[float], Any]:
    """Seconds per step of each timed window, and the last step's loss."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    loss = None
    for _ in range(warmup):
        loss = step()
    windows = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        windows.append((time.perf_counter() - start) / steps)
    return windows, loss


def plain_case(args: argparse.Namespace, compiled: bool, device: Any) -> dict[str, Any]:
    """The hand-written loop on dsrun's model (same init) and dsrun's batches (same data)."""
    import torch
    import torch.nn.functional as F

    from dsrun.data import BatchStream, build_datasets, load_tokenizer
    from dsrun.model import architecture, build_model

    cfg = compose(args, False)
    torch.manual_seed(cfg.train.seed)
    arch = architecture(cfg.model)
    rows, _, _ = build_datasets(cfg.data, load_tokenizer(cfg.model), cfg.train.seq_len, arch.vocab_size)
    batches = BatchStream(rows, cfg.train.micro_batch, 0, 1, seed=cfg.train.seed)
    model = build_model(cfg.model, arch, seed=cfg.train.seed).to(device)  # random init is built on the host
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> Any:
        inputs, labels, _ = (t.to(device) if t is not None else None for t in next(batches))
        with autocast:  # dsrun's labels are already shifted: the cross-entropy a hand-written loop computes
            logits = forward(input_ids=inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return measure("plain_compile" if compiled else "plain", args, device, step, model)


def dsrun_case(args: argparse.Namespace, compiled: bool, device: Any) -> dict[str, Any]:
    """dsrun's own setup and optimizer step, in this process."""
    from dsrun.train import setup, train_step

    run = setup(compose(args, compiled), Path(tempfile.mkdtemp()))
    counter = iter(range(1, 10**9))

    def step() -> Any:
        train_step(run, next(counter))
        loss = run.loss_sum.clone()
        run.loss_sum.zero_()
        return loss

    return measure("dsrun_compile" if compiled else "dsrun", args, device, step, run.model)


def measure(name: str, args: argparse.Namespace, device: Any, step: Callable[[], Any],
            model: Any) -> dict[str, Any]:
    import torch

    from dsrun.model import active_matmul_params

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows, loss = timed(step, device, args.warmup, args.steps, args.repeats)
    tokens = args.batch * args.seq
    per_s = tokens / statistics.median(windows)
    inner = getattr(model, "module", model)  # under Fabric's wrapper
    config = inner.config
    flops = 6 * active_matmul_params(inner) + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    return {"case": name, "tokens_per_s": round(per_s), "windows_tokens_per_s": [round(tokens / w) for w in windows],
            "mfu": round(per_s * flops / args.peak_flops, 3) if args.peak_flops else None,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
            "loss": round(float(loss), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r1_distill_qwen_1_5b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument("--set", action="append", default=[], help="a dsrun override for both loops' model")
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.peak_flops = 989e12 if device.type == "cuda" else 0.0
    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            sys.exit(f"bench/speed.py: error: --cases {case}: choose from {', '.join(CASES)}")
        loop = plain_case if case.startswith("plain") else dsrun_case
        results.append(loop(args, case.endswith("_compile"), device))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", REPO / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"device": name, "args": {k: v for k, v in vars(args).items()},
                                                "results": results}, indent=1))
    base = {r["case"]: r for r in results}
    print(f"{name}, {' '.join([f'model={args.model}', *args.set])}, micro-batch {args.batch}, seq {args.seq}, "
          f"{args.repeats} windows of {args.steps} steps (median)\n")
    print("| case | tokens/s | vs plain eager | vs plain compiled | MFU | peak GiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratios = [f"{r['tokens_per_s'] / base[k]['tokens_per_s']:.2f}x" if k in base else "-"
                  for k in ("plain", "plain_compile")]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {r['case']} | {r['tokens_per_s']:,} | {ratios[0]} | {ratios[1]} | {mfu} | {r['peak_gib'] or '-'} | "
              f"{r['loss']} |")


if __name__ == "__main__":
    main()
