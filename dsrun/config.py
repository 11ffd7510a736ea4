"""The one place the config is validated (its schema is dsrun/schema.py): `validate()` checks what types cannot —
sizes, option names and the rules that span groups. It collects every problem into one `ConfigError`; nothing
downstream re-validates. Each group's option names are its registry's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from dsrun.adapters import ADAPTERS
from dsrun.batch import auto_problem, global_batch_problem, world_size
from dsrun.chat import TRAIN_ON
from dsrun.errors import ConfigError
from dsrun.families import FAMILIES
from dsrun.hardware import hardware_problems
from dsrun.optim import OPTIMIZERS
from dsrun.precision import PRECISIONS
from dsrun.quantize import QUANT_METHODS
from dsrun.schedule import DECAYING, SCHEDULES, STABLE_PHASE, schedule_problems
from dsrun.parallelize import parallel_problems
from dsrun.schema import RunConfig, doctor_problems, inference_values, plan_problems, value_at
from dsrun.sources import SOURCES
from dsrun.strategy import STRATEGIES, preference_strategies
from dsrun.task_table import DPO_LOSSES, GRPO_KEYS, INFERENCE_TASKS, RUNNABLE_TASKS, TASKS

if TYPE_CHECKING:
    from dsrun.parallelize import ParallelConfig


# ---------------------------------------------------------------------------------------------------------------
# Validation: one function, every problem at once.

# What a card lacks when the GPU catalog's flag a precision needs (Precision.needs) is false, and the way out.
GPU_LACKS = {"bf16": "no bf16 support; use precision=fp16", "fp8": "this GPU has no FP8 tensor cores; use precision=bf16"}

# An option group's allowed names are its builder's registry (docs/architecture.md, "Option groups"); a new option
# is its YAML and one entry there. The keys below have no builder of their own, only these values.
VALUES: dict[str, tuple[str, ...]] = {"hardware.accelerator": ("cpu", "cuda"),
          "model.init": ("random", "pretrained"), "monitor.wandb.mode": ("offline", "online", "disabled"),
          "plan.mode": ("train", "dpo", "grpo", "inference"), "serve.engine": ("dsrun", "vllm"),
          "serve.reasoning": ("split", "inline"),
          "generate.show_thinking": ("dim", "show", "hide"), "generate.compile": ("auto", "true", "false"),
          "serve.compile": ("auto", "true", "false"), "bench_infer.compile": ("auto", "true", "false"),
          "data.train_on": TRAIN_ON}
REGISTRIES: dict[str, Mapping[str, Any]] = {"parallel.strategy": STRATEGIES, "precision.mode": PRECISIONS, "quant.method": QUANT_METHODS,
              "adapter.method": ADAPTERS, "data.source": SOURCES, "optim.name": OPTIMIZERS,
              "optim.schedule": SCHEDULES, "task.name": TASKS, "model.arch": FAMILIES}

# Options whose files exist so the whole surface is visible, but whose backend lands with a later issue.
PENDING: dict[tuple[str, str], str] = {}


def _positive(problems: list[str], cfg: RunConfig, keys: tuple[str, ...], allow_zero: bool = False) -> None:
    for key in keys:
        value = value_at(cfg, key)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else ">= 1"
            problems.append(f"{key}={value}: must be {bound}")


def validate(cfg: RunConfig, gpu_catalog: dict[str, Any]) -> None:
    """Raise ConfigError listing every problem of a composed, auto-resolved config (a DictConfig or RunConfig)."""
    p: list[str] = []
    hw, par, prec, tr = cfg.hardware, cfg.parallel, cfg.precision, cfg.train

    if problem := auto_problem(cfg):
        p.append(problem)
    _positive(p, cfg, ("train.accumulation", "train.seq_len",
                       "train.log_every", "hardware.devices", "hardware.num_nodes",
                       "parallel.tensor_parallel_size", "train.keep_checkpoints", "parallel.timeout_s",
                       "train.max_nonfinite_steps"))
    _positive(p, cfg, ("data.num_samples", "train.profile_steps"), allow_zero=True)
    p += schedule_problems(cfg.optim, tr.max_steps)
    if tr.profile_steps > 0 and tr.max_steps is not None and tr.max_steps < tr.profile_steps + 2:
        p.append(f"train.profile_steps={tr.profile_steps}: needs train.max_steps >= {tr.profile_steps + 2} (one step "
                 f"skipped, one to warm the profiler up); train.max_steps is {tr.max_steps}")
    if tr.checkpoint_every < -1:
        p.append(f"train.checkpoint_every={tr.checkpoint_every}: steps between checkpoints; 0 saves only at the end, "
                 "-1 never")
    if cfg.task.name == "export" and not (cfg.task.source and cfg.task.out):
        p.append("task=export needs task.source=RUN_DIR (a finished run) and task.out=OUT_DIR (a new folder), as "
                 "`dsrun export RUN_DIR OUT_DIR`")
    if cfg.task.name == "dpo":
        p += preference_problems(cfg)
    if cfg.task.name == "grpo":
        p += grpo_problems(cfg)
    if (steps := getattr(cfg.task, "steps", None)) is not None and steps < 1:  # old snapshots lack the key
        p.append(f"task.steps={steps}: must be >= 1")
    if isinstance(tr.micro_batch, int):
        _positive(p, cfg, ("train.micro_batch",))
    if problem := global_batch_problem(cfg):
        p.append(problem)
    assert tr.lr is not None  # resolve() fills it
    if tr.lr <= 0:
        p.append(f"train.lr={tr.lr}: must be > 0")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio}: must be between 0 and 1")

    for key in ("hardware.accelerator", "parallel.strategy", "precision.mode", "quant.method", "adapter.method",
                "model.arch", "model.init", "data.source", "optim.name", "task.name", "monitor.wandb.mode",
                "plan.mode"):
        p += choice_problems(cfg, key)

    p += hardware_problems(hw, gpu_catalog) + parallel_problems(par) + plan_problems(cfg.plan)
    gpu = gpu_catalog.get(hw.gpu or "", {})

    processes = world_size(cfg)
    inference_plan = cfg.task.name == "plan" and cfg.plan.mode == "inference"  # weights split, no strategy runs
    run_by = STRATEGIES.get(par.strategy)  # None: an unknown name, reported above
    if run_by is not None and run_by.one_process and processes > 1 and not inference_plan:
        p.append(f"parallel=single with {processes} processes (hardware.devices x hardware.num_nodes): "
                 "use parallel=ddp or fsdp, or set hardware.devices=1")
    if run_by is not None and run_by.needs_cuda and hw.accelerator == "cpu":
        p.append("parallel=" + par.name + ": DeepSpeed needs CUDA GPUs; on CPU use parallel=ddp or parallel=fsdp")
    if run_by is not None and not run_by.tensor_parallel and par.tensor_parallel_size != 1:
        p.append(f"parallel.tensor_parallel_size={par.tensor_parallel_size} with parallel={par.name}: only a "
                 "tensor-parallel strategy splits the matmuls; use parallel=tp or leave the size at 1")
    if run_by is not None and run_by.tensor_parallel:
        heads = cfg.model.fields.get("num_attention_heads")
        kv = cfg.model.fields.get("num_key_value_heads") or heads or 0
        tp = par.tensor_parallel_size
        if heads and (heads % tp or kv % tp):
            p.append(f"parallel.tensor_parallel_size={tp}: must divide the model's {heads} attention heads "
                     f"and {kv} key/value heads")
        if cfg.model.arch in FAMILIES and not FAMILIES[cfg.model.arch].tensor_parallel:
            dense = ", ".join(n for n, f in FAMILIES.items() if f.tensor_parallel)
            p.append(f"parallel=tp with model={cfg.model.name}: tensor parallel covers dense attention/MLP models "
                     f"({dense}); MLA + MoE models use parallel=fsdp (expert parallel is not built yet)")
        if processes % tp:
            p.append(f"parallel.tensor_parallel_size={tp}: must divide the {processes} processes")

    precision = PRECISIONS.get(prec.mode)  # an unknown mode: reported above
    if precision is not None and hw.accelerator == "cpu" and precision.gpu_only:
        p.append(f"precision={prec.name} on CPU: {precision.gpu_only}")
    elif precision is not None and precision.needs and gpu and not gpu.get(precision.needs):
        p.append(f"precision={prec.name} on {gpu.get('name', hw.gpu)}: {GPU_LACKS[precision.needs]}")
    if precision is not None and precision.loss_scaling and run_by is not None and run_by.fsdp2:
        p.append(f"precision={prec.name} with parallel={par.name}: FSDP2 has no sharded loss scaler here; use "
                 "precision=bf16")

    whole_model = run_by is None or run_by.whole_model  # an unknown strategy: reported above, no rule of its own
    if par.offload_activations and not whole_model:
        p.append(f"parallel.offload_activations=true with parallel={par.name}: offloaded checkpointing is built for "
                 "unsharded models; use parallel=single or ddp, or turn it off")
    if par.reduce_dtype == "bf16" and ((run_by is not None and not run_by.fsdp2) or precision is None
                                       or not (precision.casts_weights and precision.compute == "bfloat16")):
        p.append(f"parallel.reduce_dtype=bf16 with parallel={par.name}, precision={prec.name}: it sets FSDP2's "
                 "gradient reduction under bf16 mixed precision (parallel=fsdp or tp, precision=bf16); "
                 "set parallel.reduce_dtype=fp32")
    if par.offload_embedding and cfg.model.fields.get("tie_word_embeddings"):
        p.append(f"parallel.offload_embedding=true: model={cfg.model.name} ties its input embedding to the output "
                 "head, which the GPU needs every step; set parallel.offload_embedding=false")
    optimizer = OPTIMIZERS.get(cfg.optim.name)  # an unknown name is reported above
    if optimizer is not None and not optimizer.sharded and not whole_model:
        p.append(f"optim={cfg.optim.name} with parallel={par.name}: its states are built for whole parameters, not "
                 "FSDP/TP shards or DeepSpeed's optimizer; use parallel=single or ddp, or optim=adamw")
    if par.offload_embedding and (cfg.adapter.method == "none" or not whole_model):
        p.append(f"parallel.offload_embedding=true with adapter={cfg.adapter.method}, parallel={par.name}: the "
                 "embedding can leave the GPU only when it is frozen (adapter=lora or qlora) and unsharded "
                 "(parallel=single or ddp); change those or set parallel.offload_embedding=false")
    if cfg.quant.method != "none" and not whole_model and cfg.task.name in RUNNABLE_TASKS:
        # plans may still describe sharded quantized weights (FSDP-QLoRA with bf16 storage), which dsrun lacks
        p.append(f"quant={cfg.quant.name} with parallel={par.name}: 4/8-bit base weights are kept out of sharding "
                 "(FSDP2/ZeRO corrupt or lose their quantization state); use parallel=ddp or parallel=single")
    if cfg.task.name in INFERENCE_TASKS:
        p.extend(inference_problems(cfg))
    if cfg.quant.method != "none" and cfg.adapter.method == "none" and not inference_plan \
            and cfg.task.name not in INFERENCE_TASKS:
        p.append(f"quant={cfg.quant.name} with adapter=none: quantized weights cannot be trained directly; "
                 "add adapter=lora (QLoRA)")

    max_len = cfg.model.max_seq_len
    assert tr.seq_len is not None  # resolve() fills it
    if tr.seq_len > max_len:
        p.append(f"train.seq_len={tr.seq_len}: above model {cfg.model.name}'s maximum of {max_len}; "
                 f"set train.seq_len<={max_len}")
    if cfg.model.init == "pretrained" and not (cfg.model.path or cfg.model.hub_id):
        p.append("model.init=pretrained: set model.path=/folder/with/weights (or model.hub_id)")
    if cfg.model.init == "random" and not cfg.model.fields:
        p.append(f"model={cfg.model.name}: model.init=random needs architecture fields under model.fields")
    if cfg.data.source == "jsonl" and not cfg.data.path:
        p.append("data=jsonl: set data.path=/path/to/file.jsonl")

    p += doctor_problems(cfg.doctor)
    _length_and_eval_problems(p, cfg)

    for (group, option), issue in PENDING.items():
        # plans and dry runs describe options that land later; only tasks that execute need the backend now
        describes = group in ("quant", "parallel", "precision") and cfg.task.name not in RUNNABLE_TASKS
        if selected(cfg, group, option) and not describes:
            p.append(f"{group}={option}: lands with {issue}; not available in this version")

    p += value_problems(cfg)
    if p:
        raise ConfigError(p)


def inference_problems(cfg: RunConfig) -> list[str]:
    """generate/serve/bench_infer keys (they are checked only when one of those tasks runs)."""
    p: list[str] = []
    gen, srv, bench = cfg.generate, cfg.serve, cfg.bench_infer
    p += inference_values(gen, srv, bench)
    for key in ("serve.engine", "serve.reasoning", "generate.show_thinking", "generate.compile",
                "serve.compile", "bench_infer.compile"):
        p += choice_problems(cfg, key)
    if unknown := [q for q in bench.quants or [] if q not in QUANT_METHODS]:
        p.append(f"bench_infer.quants={list(bench.quants or [])}: unknown {', '.join(map(str, unknown))}; choose from "
                 f"{', '.join(QUANT_METHODS)}")
    if bench.quants is not None and cfg.quant.method != "none" and cfg.task.name == "bench_infer":
        p.append(f"quant={cfg.quant.method} and bench_infer.quants={list(bench.quants)}: name the quant options once "
                 "(bench_infer.quants=null measures the run's quant)")
    return p


def choice_problems(cfg: RunConfig, key: str) -> list[str]:
    """`key`'s value against its registry (or VALUES): one problem naming the choices, or none."""
    value = value_at(cfg, key)
    if key.endswith(".compile"):  # a YAML true is a bool
        value = str(value).lower()
    allowed = list(REGISTRIES[key] if key in REGISTRIES else VALUES[key])
    if value in allowed:
        return []
    return [f"{key}={value}: unknown; choose one of {', '.join(allowed)}"]


DEFAULT_MAX_STEPS = 150  # the run's length when neither train.max_steps nor train.epochs is set


def _length_and_eval_problems(p: list[str], cfg: RunConfig) -> None:
    """train.max_steps or train.epochs (one of them); the eval set and what reads it."""
    tr, data = cfg.train, cfg.data
    if tr.max_steps is not None and tr.epochs is not None:
        p.append(f"train.epochs={tr.epochs} with train.max_steps={tr.max_steps}: the run's length is one of them; "
                 "set train.max_steps=null to train by epochs")
    for key, value in (("train.max_steps", tr.max_steps), ("train.epochs", tr.epochs)):
        if value is not None and value < 1:
            p.append(f"{key}={value}: must be >= 1")
    p += choice_problems(cfg, "data.train_on")
    if data.eval_split is not None and not 0 < data.eval_split < 1:
        p.append(f"data.eval_split={data.eval_split}: the fraction of records held out must be between 0 and 1 "
                 "(exclusive), e.g. data.eval_split=0.05")
    if data.eval_split is not None and data.eval_path:
        p.append("data.eval_split with data.eval_path: choose one eval set (a held-out fraction or a second file)")
    has_eval = data.eval_split is not None or bool(data.eval_path)
    if tr.eval_every < 0:
        p.append(f"train.eval_every={tr.eval_every}: must be >= 0 (0: eval only at the end)")
    elif tr.eval_every and not has_eval:
        p.append(f"train.eval_every={tr.eval_every}: there is no eval set; set data.eval_split=0.05 or "
                 "data.eval_path=/path/to/eval.jsonl")
    if tr.keep_best and not has_eval:
        p.append("train.keep_best=true: the best checkpoint is the one of lowest eval loss; set data.eval_split or "
                 "data.eval_path")


def selected(cfg: RunConfig, group: str, option: str) -> bool:
    if group == "monitor":
        return bool(getattr(cfg.monitor, option).enabled)
    if group == "parallel":
        return cfg.parallel.strategy == option
    if group == "precision":
        return cfg.precision.mode == option
    if group == "quant":
        return cfg.quant.method == option
    if group == "task":
        return cfg.task.name == option
    raise KeyError(group)


# ---------------------------------------------------------------------------------------------------------------
# Types and ranges the schema cannot express: a YAML/command-line value is any float (nan, inf) or any integer.

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range
PORT_MAX = 65535
# architecture fields that are sizes or counts: whole numbers >= 1 (null where the architecture allows it)
MODEL_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
                    "n_shared_experts", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                    "v_head_dim", "head_dim", "max_position_embeddings", "n_group", "topk_group")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def value_problems(cfg: RunConfig) -> list[str]:
    """Finite floats, whole numbers where counts belong, and each optimizer's ranges (called by validate())."""
    p: list[str] = []
    tr, opt, hw = cfg.train, cfg.optim, cfg.hardware
    floats = {"train.lr": tr.lr, "optim.eps": opt.eps, "optim.weight_decay": opt.weight_decay,
              "optim.router_bias_rate": opt.router_bias_rate, "adapter.dropout": cfg.adapter.dropout}
    if opt.grad_clip is not None:
        floats["optim.grad_clip"] = opt.grad_clip
    if hw.memory_cap_gib is not None:
        floats["hardware.memory_cap_gib"] = hw.memory_cap_gib
    for key, value in floats.items():
        if not _finite(value):
            p.append(f"{key}={value}: must be a finite number")
    if not _whole(tr.micro_batch) and tr.micro_batch != "auto" and not isinstance(tr.micro_batch, str):
        p.append(f"train.micro_batch={tr.micro_batch}: must be a whole number >= 1, or auto")
    if _finite(opt.eps) and opt.eps <= 0:
        p.append(f"optim.eps={opt.eps}: must be > 0 (it keeps AdamW's division finite), e.g. 1e-8")
    if _finite(opt.weight_decay) and opt.weight_decay < 0:
        p.append(f"optim.weight_decay={opt.weight_decay}: must be >= 0")
    if _finite(opt.router_bias_rate) and opt.router_bias_rate < 0:
        p.append(f"optim.router_bias_rate={opt.router_bias_rate}: must be >= 0 (0 leaves the routers' biases as "
                 "they are)")
    if opt.grad_clip is not None and _finite(opt.grad_clip) and opt.grad_clip < 0:
        p.append(f"optim.grad_clip={opt.grad_clip}: must be >= 0 (0 turns clipping off, null takes the precision's)")
    if opt.name == "adamw":
        betas: list[Any] = list(opt.betas) if not isinstance(opt.betas, (str, int, float)) else [opt.betas]
        if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
            p.append(f"optim.betas={betas}: AdamW takes two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")
    if opt.name == "sgd" and not (_finite(opt.momentum) and 0 <= opt.momentum < 1):
        p.append(f"optim.momentum={opt.momentum}: SGD momentum must be in [0, 1)")
    for key, value in (("train.seed", tr.seed), ("data.seed", cfg.data.seed)):
        if not 0 <= value <= SEED_MAX:
            p.append(f"{key}={value}: must be between 0 and {SEED_MAX}")
    port = cfg.monitor.prometheus.port
    if not 0 <= port <= PORT_MAX:
        p.append(f"monitor.prometheus.port={port}: must be between 1 and {PORT_MAX} (0 picks a free port)")
    if _finite(cfg.adapter.dropout) and not 0 <= cfg.adapter.dropout < 1:
        p.append(f"adapter.dropout={cfg.adapter.dropout}: must be in [0, 1)")
    elif (cfg.adapter.method == "lora" and _finite(cfg.adapter.dropout) and cfg.adapter.dropout > 0
          and "all-linear" in list(cfg.adapter.target_modules) and cfg.model.fields.get("n_routed_experts")):
        # peft wraps the 3-D routed-expert weights in ParamWrapper, which cannot apply dropout to its input
        p.append(f"adapter.dropout={cfg.adapter.dropout} with model={cfg.model.name}: LoRA on its routed experts "
                 "(all-linear) takes no dropout; set adapter.dropout=0, or name the attention/MLP layers in "
                 "adapter.target_modules")
    if cfg.adapter.method != "none" and cfg.adapter.r < 1:
        p.append(f"adapter.r={cfg.adapter.r}: the LoRA rank must be >= 1")
    for name in MODEL_DIMENSIONS:
        value = cfg.model.fields.get(name) if cfg.model.init == "random" else None
        if value is None or (_whole(value) and value >= 1):
            continue
        p.append(f"model.fields.{name}={value}: must be a whole number >= 1 (model={cfg.model.name})")
    return p


def preference_problems(cfg: RunConfig) -> list[str]:
    """task=dpo: its two keys, and what v1 does not do yet (named, never ignored)."""
    p = []
    if not (isinstance(cfg.task.beta, (int, float)) and cfg.task.beta > 0):
        p.append(f"task.beta={cfg.task.beta}: must be > 0 (DPO's strength of the pull to the reference), e.g. 0.1")
    if cfg.task.loss not in DPO_LOSSES:
        p.append(f"task.loss={cfg.task.loss}: choose one of {', '.join(DPO_LOSSES)}")
    if cfg.data.source not in ("reasoning", "jsonl"):
        p.append(f"task=dpo with data={cfg.data.name}: preference pairs come from data=jsonl (prompt/chosen/rejected) "
                 "or data=reasoning (built-in pairs)")
    if not preference_ready(cfg.parallel):
        p.append(f"task=dpo with parallel={cfg.parallel.name}: runs under parallel={preference_strategies()}")
    return p


def preference_ready(parallel: ParallelConfig) -> bool:
    """Whether task=dpo/grpo run under this strategy (an unknown one is reported by its own check)."""
    run_by = STRATEGIES.get(parallel.strategy)
    return run_by is None or run_by.preference


def grpo_problems(cfg: RunConfig) -> list[str]:
    """task=grpo: its keys, and what v1 does not do yet (named, never ignored)."""
    from dsrun.grpo import check_group_size, reward_function

    t, p = cfg.task, []
    if not (isinstance(t.beta, (int, float)) and t.beta >= 0):
        p.append(f"task.beta={t.beta}: must be >= 0 (the weight of the KL to the reference; 0 drops it)")
    elif t.beta > 0 and cfg.adapter.method == "none":
        p.append(f"task=grpo with task.beta={t.beta} needs adapter=lora (the reference is the model with its adapters "
                 "off); for a full fine-tune set task.beta=0 (no reference, as TRL's default)")
    try:
        check_group_size(t.generations, "task.generations")
    except ConfigError as exc:
        p += exc.problems
    if t.max_completion_tokens is not None and not (_whole(t.max_completion_tokens) and t.max_completion_tokens >= 1):
        p.append(f"task.max_completion_tokens={t.max_completion_tokens}: must be a whole number >= 1, or null (what "
                 "train.seq_len leaves after the prompt)")
    elif t.max_completion_tokens is not None and t.max_completion_tokens >= (cfg.train.seq_len or 0):
        p.append(f"task.max_completion_tokens={t.max_completion_tokens}: must be below train.seq_len="
                 f"{cfg.train.seq_len} (prompt and completion share it)")
    if not (isinstance(t.temperature, (int, float)) and t.temperature > 0):
        p.append(f"task.temperature={t.temperature}: must be > 0 (a group's completions must differ), e.g. 1.0")
    if not (isinstance(t.epsilon, (int, float)) and 0 < t.epsilon < 1):
        p.append(f"task.epsilon={t.epsilon}: the ratio's clip range, between 0 and 1 (e.g. 0.2)")
    if not t.rewards:
        p.append("task.rewards: name at least one reward (exact_answer, format, or package.module.function)")
    for name in t.rewards or []:
        try:
            reward_function(str(name), "task.rewards")
        except ConfigError as exc:
            p += exc.problems
    if str(t.compile).lower() not in ("auto", "true", "false"):
        p.append(f"task.compile={t.compile}: choose auto, true or false")
    elif str(t.compile).lower() == "true" and (run_by := STRATEGIES.get(cfg.parallel.strategy)) is not None \
            and run_by.gathers(cfg.parallel):
        p.append(f"task.compile=true with parallel={cfg.parallel.name}: the rollout engine runs eagerly there "
                 "(FSDP's gathered weights move at every gather; a CUDA graph reads fixed addresses); leave "
                 "task.compile=auto")
    if cfg.data.source not in ("reasoning", "jsonl"):
        p.append(f"task=grpo with data={cfg.data.name}: prompts come from data=jsonl (prompt/answer) or "
                 "data=reasoning (the built-in arithmetic questions)")
    if cfg.data.eval_split is not None or cfg.data.eval_path:
        p.append("task=grpo does not evaluate on held-out prompts yet: unset data.eval_split / data.eval_path (the "
                 "log's reward is measured on the training prompts' fresh completions)")
    if not preference_ready(cfg.parallel):
        p.append(f"task=grpo with parallel={cfg.parallel.name}: runs under parallel={preference_strategies()}")
    if cfg.parallel.offload_embedding:
        p.append("task=grpo with parallel.offload_embedding=true: the rollout engine reads the embedding on the GPU; "
                 "set it to false")
    return p


def _read_by(group: str, selector: str, reads: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{group.key: (selector, the options that read it)} from each registry entry's `reads`."""
    keys = {key for keys in reads.values() for key in keys}
    return {f"{group}.{key}": (selector, tuple(n for n, r in reads.items() if key in r)) for key in sorted(keys)}


# Keys only some options of a group read: set on the command line under another option, they would be ignored.
READ_ONLY_BY = {**_read_by("optim", "optim.name", {n: o.reads for n, o in OPTIMIZERS.items()}),
                **_read_by("data", "data.source", {n: s.reads for n, s in SOURCES.items()}),
                "task.out": ("task.name", ("export",)),
                "task.beta": ("task.name", ("dpo", "grpo")), "task.loss": ("task.name", ("dpo",)),
                **{f"task.{key}": ("task.name", ("grpo",)) for key in GRPO_KEYS},
                "optim.min_lr_ratio": ("optim.schedule", DECAYING),
                "optim.decay_fraction": ("optim.schedule", STABLE_PHASE),
                "optim.router_bias_rate": ("model.arch", tuple(n for n, f in FAMILIES.items() if f.router_bias))}


def ignored_overrides(cfg: RunConfig, overrides: list[str]) -> list[str]:
    """Problems for overrides the chosen option would silently ignore (e.g. optim.momentum under AdamW)."""
    p = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in READ_ONLY_BY:
            selector, readers = READ_ONLY_BY[key]
            chosen = value_at(cfg, selector)
            if chosen not in readers:
                choose = selector.split(".")[0] if selector.endswith((".name", ".source")) else selector
                p.append(f"{key}: {selector}={chosen} does not use it (only {' or '.join(readers)} does); remove it, "
                         f"or choose {choose}={readers[0]}")
    return p
