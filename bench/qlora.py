"""GPU benchmark: 7B QLoRA three ways in one job — the stock transformers + peft + bitsandbytes recipe
(shared/anchors/qlora_stock.py's loop), Unsloth (shared/anchors/qlora_unsloth.py's), and dsrun quant=nf4 adapter=lora.

Same model (R1-Distill-Qwen-7B shape, random init saved once to /tmp/q7 in bf16), same token blocks in the same order
(dsrun's synthetic_tokens source and its BatchStream), same optimizer (AdamW lr 1e-4, torch defaults, no clipping,
no schedule), seq 2048, micro-batch 1, LoRA r16/alpha 32 on the seven projections. Each case runs in its own process
(Unsloth patches transformers on import; peak-memory counters stay apart): 5 warm-up steps, then 3 windows of 20
timed steps (CUDA-synchronised); tokens/s is the median window. Peaks are the allocator's (reserved decides an OOM).

    python bench/qlora.py [--steps 20] [--only stock,unsloth,dsrun,dsrun_eager,dsrun_host_embedding] [--anchors-site /tmp/anchors] [--cap-gib 8]
    python bench/qlora.py --only unsloth,dsrun,dsrun_host_embedding --cap-gib 8 --micro-batches 1,2,4   # 8 GB card: best vs best

Unsloth's wheels: ../shared/anchors/unsloth-wheels.sh, installed into --anchors-site. Writes $OUT/qlora.json and
prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = "/tmp/q7"
SEQ, WARMUP, WINDOWS, SEED, DATA_SEED, SAMPLES = 2048, 5, 3, 42, 1234, 256
# dsrun logs (one host sync) every LOG steps, as a run does, not every step: the anchors' loops never sync inside a
# window either. Losses are compared as LOG-step means, the form dsrun's log rows have. Divides WARMUP and --steps.
LOG = 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 152064
MICRO = 1  # sequences per step (--micro-batches sweeps it)


def batches():
    """dsrun's synthetic_tokens blocks (seq + 1 tokens) in dsrun's order for one process, micro-batch 1."""
    import torch

    sys.path.insert(0, str(REPO))
    from dsrun.data import BatchStream
    from dsrun.packing import Blocks

    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(DATA_SEED))
    return BatchStream(Blocks(tokens[:, :-1], tokens[:, 1:]), micro_batch=MICRO, rank=0, world_size=1, seed=SEED)


def save_model() -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if Path(MODEL_DIR, "config.json").exists():
        return
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(MODEL_DIR, max_shard_size="20GB")
    del model
    torch.cuda.empty_cache()  # the cases run in child processes; this one holds no memory while they do


def ensure_tokenizer(path: str) -> None:
    """Unsloth's loader wants a tokenizer beside the weights: the anchor's byte-level BPE over the 256 byte symbols."""
    if Path(path, "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            pad_token="<|pad|>").save_pretrained(path)


def timed_loop(model, steps: int) -> dict:
    """The anchors' loop: forward with labels (the model shifts them), backward, AdamW step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stream, losses, windows = batches(), [], []

    def step():
        inputs, labels, _ = next(stream)
        block = torch.cat([inputs, labels[:, -1:]], dim=1).cuda()  # the seq + 1 tokens: seq predictions
        loss = model(input_ids=block, labels=block).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    load_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    for _ in range(WARMUP):
        step()
    for _ in range(WINDOWS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        windows.append(SEQ * MICRO * steps / (time.perf_counter() - start))
    return {"tokens_per_s": round(statistics.median(windows)), "windows": [round(w) for w in windows],
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "load_peak_gib": round(load_peak, 2),
            "losses": [round(float(sum(losses[i:i + LOG])) / LOG, 5) for i in range(0, len(losses) - LOG + 1, LOG)]}


def case_stock(steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(SEED)
    torch.cuda.reset_peak_memory_stats()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=quant, device_map="cuda:0",
                                                 dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    model.train()
    return timed_loop(model, steps)


def case_unsloth(steps: int) -> dict:
    for key, value in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1").items():
        os.environ.setdefault(key, value)
    import unsloth  # noqa: F401 - first, so its patches apply
    import torch
    from unsloth import FastLanguageModel

    ensure_tokenizer(MODEL_DIR)
    torch.manual_seed(SEED)
    torch.cuda.reset_peak_memory_stats()
    model, _ = FastLanguageModel.from_pretrained(MODEL_DIR, max_seq_length=SEQ, load_in_4bit=True,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth")
    FastLanguageModel.for_training(model)
    return {**timed_loop(model, steps), "version": getattr(unsloth, "__version__", None)}


DSRUN_CASES = {"dsrun": ["train.compile=true"], "dsrun_eager": [],
               "dsrun_host_embedding": ["train.compile=true", "parallel.offload_embedding=true"]}


def case_dsrun(name: str, steps: int, cap_gib: float | None, out: Path) -> dict:
    """dsrun as a user runs it, on the saved model; its per-step log rows give the windows."""
    run_dir = out / "runs" / f"{name}-mb{MICRO}"
    total = WARMUP + WINDOWS * steps
    cmd = [sys.executable, "-m", "dsrun", "model=r1_distill_qwen_7b", "model.init=pretrained",
           f"model.path={MODEL_DIR}", "quant=nf4", "adapter=lora", "precision=bf16", "data=synthetic_tokens",
           f"data.num_samples={SAMPLES}", f"data.seed={DATA_SEED}", f"train.seed={SEED}", f"train.seq_len={SEQ}",
           f"train.micro_batch={MICRO}", "train.accumulation=1", f"train.max_steps={total}", "train.lr=1e-4",
           "optim.betas=[0.9,0.999]", "optim.weight_decay=0.01", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
           "optim.grad_clip=0", "parallel.activation_checkpointing=true", "parallel.offload_activations=true",
           f"train.log_every={LOG}", "train.checkpoint_every=-1", "monitor=none", "hardware=auto",
           f"hydra.run.dir={run_dir}", *DSRUN_CASES[name]]
    if cap_gib:
        cmd.append(f"hardware.memory_cap_gib={cap_gib}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dsrun exit {proc.returncode}: {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at = {row["step"]: row for row in rows}  # a row every LOG steps
    windows = []
    for w in range(WINDOWS):
        first, last = at[WARMUP + w * steps], at[WARMUP + (w + 1) * steps]
        windows.append(SEQ * MICRO * steps / (last["elapsed_s"] - first["elapsed_s"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tokens_per_s": round(statistics.median(windows)), "windows": [round(w) for w in windows],
            "peak_reserved_gib": round(max(r["peak_memory_gib"] for r in rows), 2),
            "peak_allocated_gib": round(max(r["peak_allocated_gib"] for r in rows), 2),
            "load_peak_gib": round(summary.get("load_peak_gib") or 0, 2), "losses": [r["loss"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="stock,unsloth," + ",".join(DSRUN_CASES))
    parser.add_argument("--case")  # internal: run one case in this process, print its JSON
    parser.add_argument("--anchors-site", default="/tmp/anchors")
    parser.add_argument("--cap-gib", type=float, help="cap every case's allocator at this many GiB (an 8 GB card)")
    parser.add_argument("--micro-batches", default="1", help="e.g. 1,2,4: each case at each micro-batch")
    args = parser.parse_args()
    if args.steps % LOG:
        parser.error(f"--steps must be a multiple of {LOG} (dsrun's log interval here)")
    global MICRO
    out = Path(os.environ.get("OUT", "/tmp/bench"))
    if args.case:
        MICRO = int(args.micro_batches)
        cap(args.cap_gib)
        result = case_stock(args.steps) if args.case == "stock" else case_unsloth(args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return
    save_model()  # once, before any case: the dsrun cases load it by path too
    results = {}
    sweep = args.micro_batches.split(",")
    for name, micro in ((n, m) for n in args.only.split(",") for m in sweep):
        MICRO, case = int(micro), name
        name = f"{case}@mb{micro}" if len(sweep) > 1 else case
        started = time.perf_counter()
        try:
            if case in DSRUN_CASES:
                results[name] = case_dsrun(case, args.steps, args.cap_gib, out)
            else:
                env = {**os.environ}
                if case == "unsloth":
                    env["PYTHONPATH"] = os.pathsep.join([args.anchors_site, env.get("PYTHONPATH", "")])
                proc = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps),
                                       "--micro-batches", micro, *(["--cap-gib", str(args.cap_gib)] if args.cap_gib
                                                                   else [])],
                                      capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
                results[name] = json.loads(line[len("RESULT "):])
        except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
            results[name] = {"error": str(exc)[-2000:]}
        results[name]["wall_s"] = round(time.perf_counter() - started)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "losses"}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def cap(gib: float | None) -> None:
    """The allocator capped as an 8 GB card would cap it (dsrun's hardware.memory_cap_gib does the same)."""
    if gib:
        import torch

        torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def print_table(results: dict) -> None:
    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}

    def best(case: str) -> tuple[str | None, dict]:
        """The fastest micro-batch of a case that ran (the case itself without a sweep)."""
        runs = {k: v for k, v in ok.items() if k.split("@")[0] == case}
        name = max(runs, key=lambda k: runs[k]["tokens_per_s"], default=None)
        return name, runs.get(name, {})

    stock = best("stock")[1].get("tokens_per_s")
    unsloth = best("unsloth")[1].get("tokens_per_s")
    ref_losses = next((v["losses"] for k, v in ok.items() if k.split("@")[0] == "stock"), None)
    at_30 = 30 // LOG - 1  # the mean of steps 26-30
    print("| case | tokens/s (median of 3 x 20 steps) | vs stock | vs Unsloth | peak reserved GiB | peak allocated GiB "
          "| load peak GiB | loss over steps 26-30 vs stock |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in ok.items():
        loss_gap = ""
        if ref_losses and len(r["losses"]) > at_30 and len(ref_losses) > at_30:
            loss_gap = f"{100 * (r['losses'][at_30] - ref_losses[at_30]) / ref_losses[at_30]:+.2f} %"
        ratio = lambda ref: f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"  # noqa: E731 - a case may not have run
        print(f"| {name} | {r['tokens_per_s']:,} | {ratio(stock)} | {ratio(unsloth)} | {r['peak_reserved_gib']} | "
              f"{r['peak_allocated_gib']} | {r['load_peak_gib']} | {loss_gap} |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else ''} |")
    winners = {case: best(case)[0] for case in ("unsloth", *DSRUN_CASES)}
    print("\nfastest micro-batch per case: " + ", ".join(f"{case} {name} {ok[name]['tokens_per_s']:,} tokens/s"
                                                      for case, name in winners.items() if name))


if __name__ == "__main__":
    main()
