"""The run's typed config schema: `RunConfig`, composed from each group's settings dataclass (a group with a
registry keeps its settings beside it: `ParallelConfig` in parallelize.py, `QuantConfig` in quantize.py,
`ModelConfig` with the model families, ...) and the settings of the tasks, registered with Hydra's ConfigStore.
Every group under `conf/` merges into it, so a typo'd key or a wrong type fails at composition; config.py then
checks what types cannot."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from dsrun.adapters import AdapterConfig
from dsrun.families import ModelConfig
from dsrun.hardware import HardwareConfig
from dsrun.monitor import MONITORS
from dsrun.optim import OptimConfig
from dsrun.parallelize import ParallelConfig
from dsrun.precision import PrecisionConfig
from dsrun.quantize import QuantConfig
from dsrun.sources import DataConfig


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # null: DEFAULT_MAX_STEPS, unless train.epochs sets the length
    micro_batch: Any = 4  # a number, or auto: the largest that fits, keeping global_batch (dsrun/batch_size.py)
    accumulation: int = 1
    global_batch: Optional[int] = None  # when set, accumulation = this / (micro_batch x data-parallel size)
    seq_len: Optional[int] = None  # null: the model option's finetune.seq_len
    lr: Optional[float] = None  # null: the model option's finetune.lr (finetune.lora_lr under an adapter)
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end; -1: never (benchmarks)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | a checkpoint path
    overwrite: bool = False  # train.resume=never in a folder that holds checkpoints replaces them (dsrun/run/folder.py)
    force: bool = False  # launch even when the plan says it will not fit
    max_nonfinite_steps: int = 5  # consecutive skipped non-finite steps before the run stops
    compile: bool = False
    profile_steps: int = 0  # torch.profiler over this many steps after two (dsrun/profiling.py); 0: off
    epochs: Optional[int] = None  # the run's length in passes over the data, instead of train.max_steps
    eval_every: int = 0  # steps between eval-loss passes (and at the end); 0: only at the end
    keep_best: bool = False  # keep the checkpoint of the lowest eval loss as checkpoints/best


@dataclass
class TaskConfig:
    name: str = "train"
    steps: Optional[int] = None  # task=smoke: run at most this many steps (conf/task/smoke.yaml: 100)
    source: Optional[str] = None  # generate/serve/bench_infer: a run or model folder; null: the model option
    out: Optional[str] = None  # task=export: a new folder for the Hugging Face model
    # task=dpo/grpo: how far from the reference the policy may move (dpo: 0.1; grpo: the KL's weight, 0: none)
    beta: Optional[float] = None
    loss: Optional[str] = None  # task=dpo: sigmoid (DPO) | ipo (dsrun/preference.py)
    generations: Optional[int] = None  # task=grpo: completions sampled per prompt, the group (dsrun/reinforce.py)
    max_completion_tokens: Optional[int] = None  # task=grpo: new tokens a completion at most; null: what seq_len leaves
    temperature: Optional[float] = None  # task=grpo: sampling temperature of the rollouts
    epsilon: Optional[float] = None  # task=grpo: the clip range of the policy ratio
    rewards: Optional[List[str]] = None  # task=grpo: exact_answer | format | package.module.function, summed
    compile: Optional[str] = None  # task=grpo: auto | true | false: the rollout engine's decode step compiled (CUDA)


@dataclass
class PlanConfig:
    """task=plan: what to plan and the prices it costs with (dsrun/plan/, docs/planner.md)."""
    mode: str = "train"  # train | dpo (pairs: two sequences a row, the reference pass) | grpo | inference
    generations: int = 8  # plan.mode=grpo: completions per prompt (task.generations of the run planned)
    context: int = 4096  # inference: tokens per sequence the KV cache holds (prompt + output)
    batch: int = 1  # inference: sequences decoded together
    json: bool = False  # print the plan as JSON on stdout (sweeps, tests)
    electricity_usd_per_kwh: float = 0.15
    lifetime_years: float = 3.0  # hardware amortised over this many years of continuous use
    gpu_price_usd: Optional[float] = None  # null: the catalog's indicative price
    network_gbps: Optional[float] = None  # between nodes; null: 2.5 for ethernet (a consumer 2.5 GbE switch), 400 for
    # infiniband (one NDR port per GPU)
    host_ram_gib: Optional[float] = None  # per node, checked for offload plans; null: not checked
    mfu: Optional[float] = None  # null: the planner's assumption for the GPU class


def counts_below_one(values: Iterable[tuple[str, int]]) -> list[str]:
    """A problem for each (key, value) whose count is below 1."""
    return [f"{key}={value}: must be >= 1" for key, value in values if value < 1]


def plan_problems(plan: PlanConfig) -> list[str]:
    """The plan group's own values (validate() adds the rules that span groups)."""
    p = counts_below_one((("plan.context", plan.context), ("plan.batch", plan.batch)))
    if plan.electricity_usd_per_kwh < 0:
        p.append(f"plan.electricity_usd_per_kwh={plan.electricity_usd_per_kwh}: must be >= 0")
    if plan.lifetime_years <= 0:
        p.append(f"plan.lifetime_years={plan.lifetime_years}: must be > 0")
    if plan.mfu is not None and not 0 < plan.mfu <= 1:
        p.append(f"plan.mfu={plan.mfu}: must be in (0, 1]")
    return p


@dataclass
class DoctorConfig:
    """task=doctor: what the machine check measures (dsrun/doctor/, docs/doctor.md)."""
    json: bool = False  # print the report as JSON on stdout
    min_bytes: int = 8  # all-reduce sweep: smallest message (its time is the latency)
    max_bytes: Optional[int] = None  # largest message; null: 4 MiB over CPU processes, 256 MiB over GPUs
    iterations: int = 20  # timed all-reduces per message size
    timeout_s: int = 120  # a collective that takes longer fails the sweep instead of hanging


def doctor_problems(doctor: DoctorConfig) -> list[str]:
    """The doctor group's own values."""
    p = counts_below_one((("doctor.iterations", doctor.iterations), ("doctor.timeout_s", doctor.timeout_s)))
    if doctor.min_bytes < 4:
        p.append(f"doctor.min_bytes={doctor.min_bytes}: must be >= 4 (one float32)")
    if doctor.max_bytes is not None and doctor.max_bytes < doctor.min_bytes:
        p.append(f"doctor.max_bytes={doctor.max_bytes}: must be >= doctor.min_bytes ({doctor.min_bytes})")
    return p


@dataclass
class GenerateConfig:
    """task=generate (dsrun/inference/generate.py): one prompt, a file of prompts, or an interactive loop."""
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None  # one prompt per line
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    show_thinking: str = "dim"  # dim | show | hide: the <think> part on the console (stdout keeps only the answer
    # when hidden)
    compile: str = "auto"  # auto (on CUDA) | true | false: the engine's decode step compiled and CUDA-graphed


@dataclass
class ServeConfig:
    """task=serve (dsrun/inference/server.py): an OpenAI-compatible HTTP endpoint."""
    engine: str = "dsrun"  # dsrun (in process, dsrun/inference/engine.py) | vllm (`vllm serve`, its own env)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port and prints it
    model_name: Optional[str] = None  # the id /v1/models lists; null: the source folder's name or the model option
    api_key_env: Optional[str] = None  # name of the environment variable holding the API key; null: no key
    metrics_public: bool = False  # /metrics without the API key (a Prometheus scraper that holds none)
    reasoning: str = "split"  # split: R1's <think> part in reasoning_content (as vLLM's deepseek_r1 parser) |
    # inline: all of it in content
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the most a request may ask for (and the default when it asks for none)
    max_queue: int = 64  # requests waiting or running; more get 503
    max_batch: int = 32  # sequences decoded together: the engine's slots, each max_prompt_tokens + max_tokens long
    prefill_tokens: int = 2048  # prompt tokens per prefill chunk between two decode steps
    compile: str = "auto"  # auto (on CUDA) | true | false: the engine's decode step compiled and CUDA-graphed
    temperature: float = 0.6  # default for requests that set none (R1's recommended sampling)
    top_p: float = 0.95
    seed: int = 0


@dataclass
class BenchInferConfig:
    """task=bench_infer (dsrun/inference/bench.py): TTFT, decode and aggregate tokens/s, peak memory."""
    batches: List[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_tokens: int = 512
    new_tokens: int = 256
    concurrent: int = 32  # requests sent to the engine at once
    static_anchor: bool = True  # on CUDA, also time transformers' generate with its static cache, compiled
    compile: str = "auto"  # auto (on CUDA) | true | false: the engine's decode step compiled and CUDA-graphed
    # null: the run's own `quant`; a list: each loaded and measured in turn
    quants: Optional[List[str]] = None
    json_path: Optional[str] = None  # also write the rows here (they always go to <run>/bench_infer.json)


def inference_values(gen: GenerateConfig, srv: ServeConfig, bench: BenchInferConfig) -> list[str]:
    """The generate, serve and bench_infer groups' own values (checked when one of those tasks runs)."""
    p = counts_below_one((("generate.max_new_tokens", gen.max_new_tokens), ("serve.max_prompt_tokens",
                          srv.max_prompt_tokens), ("serve.max_tokens", srv.max_tokens), ("serve.max_queue",
                          srv.max_queue), ("serve.max_batch", srv.max_batch), ("serve.prefill_tokens",
                          srv.prefill_tokens), ("bench_infer.prompt_tokens", bench.prompt_tokens),
                          ("bench_infer.new_tokens", bench.new_tokens), ("bench_infer.concurrent", bench.concurrent)))
    if any(b < 1 for b in bench.batches) or not bench.batches:
        p.append(f"bench_infer.batches={list(bench.batches)}: a non-empty list of batch sizes >= 1")
    for key, temperature in (("generate.temperature", gen.temperature), ("serve.temperature", srv.temperature)):
        if temperature < 0:
            p.append(f"{key}={temperature}: must be >= 0 (0 is greedy)")
    for key, share in (("generate.top_p", gen.top_p), ("serve.top_p", srv.top_p)):
        if not 0 < share <= 1:
            p.append(f"{key}={share}: must be in (0, 1]")
    if not 0 <= srv.port <= 65535:
        p.append(f"serve.port={srv.port}: must be a TCP port (0 picks a free one)")
    if gen.prompt is not None and gen.prompts_file is not None:
        p.append("generate.prompt and generate.prompts_file: give one of them")
    return p


# monitor.<name>: one settings block per entry of the monitor registry (dsrun/monitor/__init__.py), so a new
# monitor is its YAML and its entry there
MonitorConfig = make_dataclass("MonitorConfig", [(name, entry.settings, field(default_factory=entry.settings))
                                                 for name, entry in MONITORS.items()])


@dataclass
class RunConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    if TYPE_CHECKING:  # made from MONITORS at import (above): its fields are not known before the code runs
        monitor: Any = None
    else:
        monitor: MonitorConfig = field(default_factory=MonitorConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    bench_infer: BenchInferConfig = field(default_factory=BenchInferConfig)


@functools.cache  # once per process (the structured config takes a tenth of a second to build), forks included
def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def typed(cfg: DictConfig) -> RunConfig:
    """A config composed against RunConfig, typed as it: the DictConfig reads like the dataclass (attribute access,
    the same values), Hydra's structured-config idiom. Where the composed config enters dsrun's typed code."""
    return cast(RunConfig, cfg)


def container(cfg: RunConfig) -> DictConfig:
    """The DictConfig behind typed(), for what only a container does (walk the groups, print YAML)."""
    return cast(DictConfig, cfg)


def value_at(cfg: RunConfig, key: str) -> Any:
    """The value at a dotted key ("train.lr"), read attribute by attribute (a DictConfig and the planner's copy alike)."""
    return functools.reduce(getattr, key.split("."), cfg)
