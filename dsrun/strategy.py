"""parallel x precision x hardware -> a Lightning Fabric; the NCCL/Gloo environment is applied before it starts."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator

from dsrun.batch import world_size
from dsrun.errors import UserError
from dsrun.hardware import cuda_devices_present, devices_per_node
from dsrun.precision import PRECISIONS

if TYPE_CHECKING:
    from dsrun.parallelize import ParallelConfig
    from dsrun.hardware import HardwareConfig
    from dsrun.schema import RunConfig



def apply_environment(hardware_cfg: HardwareConfig) -> None:
    """The hardware option's NCCL/Gloo variables; a variable the user already exported wins."""
    for name, value in hardware_cfg.env.items():
        os.environ.setdefault(str(name), str(value))


def check_environment(cfg: RunConfig) -> None:
    """What the config cannot know: does this machine have the devices it asks for? (Not for plan / dry runs.)"""
    hw = cfg.hardware
    if hw.num_nodes > 1 and not launched():
        # without a launcher the rendezvous waits for nodes that were never started (parallel.timeout_s, silently)
        raise UserError(f"hardware.num_nodes={hw.num_nodes}: a run over several machines is started on each of them "
                        "by a launcher, and this process was not (no torchrun or SLURM environment): run `torchrun "
                        f"--nnodes {hw.num_nodes} --node_rank $NODE_RANK --nproc_per_node {hw.devices} --master_addr "
                        "HOST --master_port 29500 -m dsrun ...` on every node (README, \"Several processes, "
                        "several nodes\"), or set hardware.num_nodes=1")
    if hw.accelerator == "cuda":
        present = cuda_devices_present()
        if devices_per_node(hw) > present:
            raise UserError(f"hardware={hw.name} asks for {hw.devices} GPUs per node but this machine has {present}; "
                            f"set hardware.devices={present or 1}{' or hardware=cpu' if not present else ''}, "
                            "or use task=plan to plan without the GPUs")


def launched() -> bool:
    """Whether a launcher that starts every node's processes started this one (torchrun, SLURM)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ or (
        "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def all_reduce_(tensor: Any, op: str = "sum") -> Any:
    """Reduce in place over every rank, queued on the device's stream (a no-op on one process). Not Fabric's
    all_reduce: that puts a barrier before each reduction, a host wait for every rank, and the two reductions of
    each step kept 2-GPU DDP and FSDP at 1.7x their one GPU, the plain DDP loop at 1.9x."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the composed config (saved in the run folder as deepspeed.json).
    Clipping lives here, not in the loop: ZeRO keeps gradients partitioned inside its optimizer."""
    par, precision = cfg.parallel, PRECISIONS[cfg.precision.mode]
    zero: dict[str, Any] = {"stage": par.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8}
    if par.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if par.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if par.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        # the loop accumulates (its loss is already divided by train.accumulation) and steps the engine once per
        # optimizer step: DeepSpeed must neither count micro-steps nor divide the loss again
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip(cfg),
        "zero_optimization": zero,
        "bf16": {"enabled": precision.compute == "bfloat16"},
        "fp16": {"enabled": precision.compute == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        # offload runs torch's AdamW on the host: no JIT-built DeepSpeedCPUAdam needed (slower, always available)
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }


def grad_clip(cfg: RunConfig) -> float:
    """optim.grad_clip, or the precision's default when unset (fp16: 0.5, conf/precision/fp16.yaml); 0 turns clipping
    off."""
    return cfg.optim.grad_clip if cfg.optim.grad_clip is not None else cfg.precision.default_grad_clip


def build_fabric(cfg: RunConfig):
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    apply_environment(cfg.hardware)
    accelerator = "cuda" if cfg.hardware.accelerator == "cuda" else "cpu"
    backend = "nccl" if accelerator == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    record = PRECISIONS[cfg.precision.mode]
    precision: Any = record.fabric  # one of Fabric's precision literals
    strategy = STRATEGIES[cfg.parallel.strategy].build(cfg, backend, timeout)  # validate() knows every strategy
    if isinstance(strategy, ModelParallelStrategy) and record.autocast:
        precision = "32-true"  # FSDP2 applies mixed precision itself (parallelize.apply_fsdp)
    return L.Fabric(accelerator=accelerator, devices=devices_per_node(cfg.hardware), num_nodes=cfg.hardware.num_nodes,
                    strategy=strategy, precision=precision)


def _single(cfg: RunConfig, backend: str, timeout: timedelta) -> Any:
    return "auto"


def _ddp(cfg: RunConfig, backend: str, timeout: timedelta) -> Any:
    from lightning.fabric.strategies import DDPStrategy

    # gradients as views into the all-reduce buckets: saves a full fp32 copy of the gradients
    return DDPStrategy(process_group_backend=backend, timeout=timeout, gradient_as_bucket_view=True)


def _model_parallel(cfg: RunConfig, backend: str, timeout: timedelta) -> Any:
    """FSDP2, and FSDP2 over a tensor-parallel mesh (parallel=tp)."""
    from lightning.fabric.strategies import ModelParallelStrategy

    from dsrun.parallelize import parallelize

    tp = cfg.parallel.tensor_parallel_size  # 1 under FSDP alone (validate())
    return ModelParallelStrategy(
        parallelize_fn=lambda model, mesh: parallelize(model, parallel=cfg.parallel, precision=cfg.precision,
                                                       compile=cfg.train.compile, mesh=mesh),
        data_parallel_size=world_size(cfg) // tp, tensor_parallel_size=tp, process_group_backend=backend,
        timeout=timeout)


def _deepspeed(cfg: RunConfig, backend: str, timeout: timedelta) -> Any:
    from lightning.fabric.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(cfg), process_group_backend=backend, timeout=timeout)


STATE = ("weights", "gradients", "optimizer")


def _none(parallel: ParallelConfig) -> frozenset[str]:
    return frozenset()


def _all(parallel: ParallelConfig) -> frozenset[str]:
    return frozenset(STATE)


def _zero_stage(parallel: ParallelConfig) -> frozenset[str]:
    """ZeRO stage 1 shards the optimizer state, 2 the gradients too, 3 the weights too."""
    return frozenset(STATE[len(STATE) - parallel.zero_stage:]) if parallel.zero_stage else frozenset()


@dataclass(frozen=True)
class Strategy:
    """One parallel.strategy: how Fabric runs it, and the facts the planner, validate() and the tasks ask of it
    (never its name)."""

    build: Callable[[Any, str, timedelta], Any]  # (cfg, process-group backend, collective timeout) -> Fabric's
    shards: Callable[[Any], frozenset[str]] = _none  # parallel -> which of STATE are split over data-parallel ranks
    # every rank holds the whole model as one plain module (torch autocast, the host-memory embedding, offloaded
    # activations, quantized bases and any optimizer work there)
    whole_model: bool = False
    one_process: bool = False  # runs in one process only
    needs_cuda: bool = False  # no CPU (gloo) implementation
    fsdp2: bool = False  # fully_shard (parallelize.py): its own mixed-precision policy and gradient reduce dtype
    all_reduces: bool = False  # gradients all-reduced once per optimizer step (DDP)
    tensor_parallel: bool = False  # each block's matmuls split over parallel.tensor_parallel_size ranks
    # DeepSpeed ZeRO: 16-bit weights and gradients with the fp32 master inside its optimizer, communication buckets
    # allocated up front, its own optimizer step and precision
    zero: bool = False
    offloads: bool = False  # parallel.offload moves its sharded state to host RAM (FSDP's CPU offload, ZeRO-Offload)
    # task=dpo/grpo: every rank scores (and samples) its own rows with the model's weights (FSDP gathers them)
    preference: bool = False
    # with parallel.offload: the host optimizer's streaming rate, bytes/s per process (the planner's step time;
    # 16-core H100 host, torch AdamW under FSDP2: 8.4 s a step for 1.78B fp32-state parameters, 20 s for 7.6B bf16
    # ones; DeepSpeed's CPU Adam under ZeRO-3: 3.2 s for 1.78B)
    host_optimizer_bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.offloads and self.host_optimizer_bytes_per_s <= 0:
            raise ValueError("a strategy that offloads (offloads=True) names its host optimizer's bytes/s")

    def gathers(self, parallel: ParallelConfig) -> bool:
        """Shards the weights and gathers them block by block (FSDP, its TP mesh, ZeRO-3)."""
        return "weights" in self.shards(parallel)


# The parallel.strategy registry. Adding a strategy: conf/parallel/<option>.yaml and one entry here with its facts
# (setup order, micro-step sync and the optimizer step below branch on the strategy object, not its name).
STRATEGIES: dict[str, Strategy] = {
    "single": Strategy(_single, one_process=True, whole_model=True, preference=True),
    "ddp": Strategy(_ddp, whole_model=True, all_reduces=True, preference=True),
    "fsdp": Strategy(_model_parallel, shards=_all, fsdp2=True, offloads=True, preference=True,
                     host_optimizer_bytes_per_s=3.5e9),
    "deepspeed": Strategy(_deepspeed, shards=_zero_stage, needs_cuda=True, zero=True, offloads=True,
                          host_optimizer_bytes_per_s=8.8e9),
    "tp": Strategy(_model_parallel, shards=_all, fsdp2=True, tensor_parallel=True),
}


def preference_strategies() -> str:
    """The strategies task=dpo/grpo run under, for a message."""
    names = [name for name, strategy in STRATEGIES.items() if strategy.preference]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def is_deepspeed(fabric: Any) -> bool:
    from lightning.fabric.strategies import DeepSpeedStrategy

    return isinstance(fabric.strategy, DeepSpeedStrategy)


def zero3_partitioned(fabric: Any, cfg: RunConfig) -> bool:
    """ZeRO-3 partitions every weight; one is whole only while its own module runs."""
    return is_deepspeed(fabric) and cfg.parallel.zero_stage == 3


@contextlib.contextmanager
def model_init(fabric: Any, cfg: RunConfig) -> Iterator[None]:
    """Where the model is built. ZeRO-3 builds it partitioned (zero.Init); transformers initialises weights
    correctly there only while an HfDeepSpeedConfig is alive."""
    if zero3_partitioned(fabric, cfg):
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(fabric.strategy.config)  # noqa: F841 (its lifetime is the point)
        with fabric.init_module(empty_init=True):
            yield
        return
    with fabric.init_module(empty_init=False):
        yield


def setup(fabric: Any, cfg: RunConfig, model: Any, make_optimizer: Any) -> tuple[Any, Any]:
    """Wrap the model for its strategy and build the optimizer in the order that strategy needs: after sharding
    for FSDP2/TP (the optimizer must see the DTensor parameters), together with the model for DeepSpeed."""
    from lightning.fabric.strategies import ModelParallelStrategy

    from dsrun.parallelize import parallelize

    if isinstance(fabric.strategy, ModelParallelStrategy):
        model = fabric.setup_module(model)  # calls parallelize() with the device mesh
        return model, fabric.setup_optimizers(make_optimizer(model))
    # fp8 / activation checkpointing / compile; no mesh
    model = parallelize(model, parallel=cfg.parallel, precision=cfg.precision, compile=cfg.train.compile)
    return fabric.setup(model, make_optimizer(model))


@contextlib.contextmanager
def micro_step(fabric: Any, model: Any, accumulating: bool) -> Iterator[Callable[[Any], None]]:
    """Forward + backward of one micro-batch; yields `backward(loss)`. Gradients are reduced once per optimizer
    step: DDP/FSDP skip the sync while accumulating (the context must cover the forward too); DeepSpeed's engine
    accumulates until optimizer_step steps it (unmanaged accumulation) and must not divide the loss again."""
    if is_deepspeed(fabric):
        yield lambda loss: fabric.backward(loss, scale_wrt_gas=False)
        return
    with fabric.no_backward_sync(model, enabled=accumulating and fabric.world_size > 1):
        yield fabric.backward


def optimizer_step(fabric: Any, optimizer: Any, params: Any, max_norm: float) -> tuple[Any, Any]:
    """Clip, step, zero the gradients. Returns (total gradient norm before clipping, whether it stepped), both
    0-d tensors on the device: a step whose gradients are not finite is skipped, so the weights (and every
    checkpoint) stay finite. Fused AdamW skips and clips on the device (`found_inf` and `grad_scale`, what
    GradScaler uses), so the host never waits for the step it has just queued and the gradients are read once
    less; other optimizers clip in place and decide on the host (one sync)."""
    import torch

    if is_deepspeed(fabric):
        # the engine's own step: Fabric's optimizer wrapper steps the ZeRO optimizer underneath it, so the engine
        # never recorded the gradient norm (None) nor zeroed its gradients. Every call is the accumulation boundary
        # (managed_gradient_accumulation off, deepspeed_config); the engine clips and skips overflowed fp16 steps.
        engine = fabric.strategy.model
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm), device=fabric.device)
        return norm, torch.isfinite(norm)
    inner = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper shares no new attributes with it
    if inner.defaults.get("fused") and getattr(fabric.strategy.precision, "scaler", None) is None:
        norm = clip_gradients(fabric, optimizer, params, 0)
        finite = torch.isfinite(norm)
        inner.found_inf = (~finite).float()  # the fused kernel leaves weights, states and step count as they were
        if max_norm > 0:  # clipping inside the kernel (it divides each gradient by grad_scale): no pass over them
            inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)  # clip_grad_norm_'s coefficient, inverted
        optimizer.step()
        inner.__dict__.pop("grad_scale", None)
        del inner.found_inf
    else:
        norm = clip_gradients(fabric, optimizer, params, max_norm)
        finite = torch.isfinite(norm)
        if finite.item():
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


NORM_CHUNK = 1 << 24  # elements cast to fp64 at a time: 128 MiB, not a copy of the whole gradient


def _squared_norm_fp64(grads: list[Any]) -> Any:
    """Sum of squares of plain (local) tensors in fp64: one fp64 norm kernel per tensor (per NORM_CHUNK elements
    of a large one: casting a 1.5B model's embedding gradient whole put a 1.7 GiB fp64 copy at the step's peak),
    then one square-and-sum over all of them (not a square per tensor: 340 more kernels a step)."""
    import torch

    norms = [torch.linalg.vector_norm(piece, dtype=torch.float64)
             for g in grads for piece in (g.reshape(-1).split(NORM_CHUNK) if g.numel() > NORM_CHUNK else (g,))]
    return torch.stack(norms).square().sum()


def checkpoint_state(fabric: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """What a checkpoint restores besides the loop's counters: the fp16 loss scaler too, where there is one."""
    state = {"model": model, "optimizer": optimizer}
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    if scaler is not None:
        state["scaler"] = scaler
    return state


def full_state_dict(fabric: Any, model: Any) -> dict[str, Any]:
    """Unsharded weights on CPU for rank 0. Collective: every rank calls it."""
    import torch.distributed as dist

    if is_deepspeed(fabric):
        engine = fabric.strategy.model
        if fabric.strategy.zero_stage_3:
            return engine._zero3_consolidated_16bit_state_dict() or {}  # transformers' Trainer does the same
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_gradients(fabric: Any, optimizer: Any, params: Any, max_norm: float) -> Any:
    """Clip to max_norm (0: measure only) and return the total gradient norm before clipping.

    Norms accumulate in fp64, so every strategy reports the same norm whatever its summation order (an fp32 sum
    over a 129k-row embedding drifts ~1e-5 between sharded and unsharded layouts; per-tensor fp32 norms combined in
    fp64 still drifted 1e-4 over 20 clipped FSDP steps). Sharded (DTensor) gradients are read through their local
    shards: every DTensor operator costs ~0.1 ms of Python dispatch, and a norm plus a sum per gradient over a
    1.5B model's ~340 tensors cost 2-GPU FSDP2 a third of its step. The local sums of one layout (mesh and
    placements; FSDP2 + TP have two) become one partial DTensor, reduced in one collective."""
    import torch

    fabric.strategy.precision.unscale_gradients(optimizer)  # fp16 loss scaling; a no-op otherwise
    groups: dict[Any, list[Any]] = {}
    for p in params:
        if p.grad is not None:
            key = (getattr(p.grad, "device_mesh", None), getattr(p.grad, "placements", None))
            groups.setdefault(key, []).append(p.grad)
    squares, local_grads = [], []
    for (mesh, placements), grads in groups.items():
        if mesh is not None and any(p.is_partial() for p in placements):  # not reduced yet: DTensor does it
            local_grads += grads
            squares.append(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads).full_tensor())
            continue
        local = [g.to_local() for g in grads] if mesh is not None else grads
        local_grads += local
        sq = _squared_norm_fp64(local)
        squares.append(_sum_over_shards(sq, mesh, placements) if mesh is not None else sq)
    total = torch.stack(squares).sum().sqrt().float()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
        by_dtype: dict[Any, list[Any]] = {}
        for g in local_grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            torch._foreach_mul_(same, coef.to(same[0].dtype))
    return total


def _sum_over_shards(local_sq: Any, mesh: Any, placements: Any) -> Any:
    """A local sum of squares -> the sum over the mesh dimensions the tensors are sharded on (replicated
    dimensions hold copies and are not summed)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    partial = [Partial() if p.is_shard() else Replicate() for p in placements]
    return DTensor.from_local(local_sq, mesh, partial, run_check=False).full_tensor()
