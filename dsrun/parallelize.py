"""One pure function turns a model into its parallel form, in torchtitan's fixed order:
float8 linears -> tensor parallel -> activation checkpointing (block inputs on the GPU, or offloaded to host
memory) -> per-block compile -> FSDP2 (blocks, then root)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsrun.precision import PRECISIONS, PrecisionConfig

if TYPE_CHECKING:  # torch loads with the first model, not with the config schema that reads the dataclass below
    from torch import nn


@dataclass
class ParallelConfig:
    name: str = "single"
    strategy: str = "single"  # single | ddp | fsdp | deepspeed | tp
    zero_stage: int = 0
    offload: bool = False
    reshard_after_forward: bool = True
    reduce_dtype: str = "fp32"  # fsdp/tp under bf16 mixed precision: gradients reduce-scattered in fp32 | bf16
    activation_checkpointing: bool = False
    offload_activations: bool = False  # with checkpointing: block inputs wait in pinned host memory (single/ddp)
    offload_embedding: bool = False  # a frozen input embedding stays in host memory; its rows travel with the batch
    tensor_parallel_size: int = 1
    timeout_s: int = 1800  # collective timeout before the job aborts


def parallel_problems(par: ParallelConfig) -> list[str]:
    """The parallel group's own values (validate() adds the rules that span groups)."""
    p = []
    if par.offload_activations and not par.activation_checkpointing:
        p.append("parallel.offload_activations=true: offloads the inputs activation checkpointing keeps; set "
                 "parallel.activation_checkpointing=true too")
    if par.reduce_dtype not in ("fp32", "bf16"):
        p.append(f"parallel.reduce_dtype={par.reduce_dtype}: choose fp32 or bf16")
    return p


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names transformers marks as unsplittable (peft-wrapped too)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def parallelize(model: nn.Module, *, parallel: ParallelConfig, precision: PrecisionConfig, compile: bool,
                mesh: Any = None) -> nn.Module:
    """mesh is Fabric's ("data_parallel", "tensor_parallel") DeviceMesh for fsdp/tp, None for single/ddp."""
    from dsrun.activation_offload import offload_checkpointing

    par = parallel
    if PRECISIONS[precision.mode].fp8:
        apply_float8(model)
    if mesh is not None and mesh["tensor_parallel"].size() > 1:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    blocks = decoder_blocks(model)
    offload = par.activation_checkpointing and par.offload_activations
    if offload:  # compiles the block inside the checkpoint: the offloading wrapper stays eager
        offload_checkpointing(blocks, compile=compile)
    elif par.activation_checkpointing:
        apply_activation_checkpointing(model, blocks)
        blocks = decoder_blocks(model)
    if compile and not offload:
        for block in blocks:
            block.compile()
    if mesh is not None:
        apply_fsdp(model, blocks, mesh["data_parallel"], parallel=parallel, precision=precision)
    return model


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module]) -> None:
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as wrap
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    block_types = tuple({type(b) for b in blocks})
    wrap(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_fn=checkpoint_with_grad),
         check_fn=lambda m: isinstance(m, block_types))


def checkpoint_with_grad(block: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint, skipped where autograd is off: GRPO's rollouts and eval run the block as
    is. Without a backward there is nothing to replay, and under the engine's compiled decode step the checkpoint
    is traced as a higher-order op that breaks the graph at every block: many graphs to compile and replay instead
    of one (tests/test_engine.py)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return block(*args, **kwargs)
    return checkpoint(block, *args, use_reentrant=False, **kwargs)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], dp_mesh: Any, *, parallel: ParallelConfig,
               precision: PrecisionConfig) -> None:
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # Fabric's precision flag does not reach FSDP2 (its ModelParallelStrategy ignores it for the sharded
    # parameters): mixed precision is FSDP's own policy, as in lightning's examples/fabric/tensor_parallel
    record = PRECISIONS[precision.mode]
    compute = getattr(torch, record.compute) if record.casts_weights else None
    reduce = torch.bfloat16 if parallel.reduce_dtype == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce) if compute else MixedPrecisionPolicy()
    options = {"mesh": dp_mesh, "mp_policy": policy,
               "offload_policy": CPUOffloadPolicy() if parallel.offload else None}
    options = {k: v for k, v in options.items() if v is not None}
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        reshard = parallel.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **options)
    fully_shard(model, reshard_after_forward=parallel.reshard_after_forward, **options)


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Column-parallel q/k/v and gate/up, row-parallel o and down (Megatron layout) in every block.
    Attention reshapes with -1 heads, so each rank runs its share of the heads unchanged."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in decoder_blocks(model):
        parallelize_module(block, tp_mesh, plan)


def apply_float8(model: nn.Module) -> None:
    """torchao float8 training (dynamic tensorwise scaling) on every block linear whose dims fp8 GEMMs accept;
    the output head stays bf16 (its softmax is precision-sensitive)."""
    from torch import nn
    from torchao.float8 import convert_to_float8_training

    def eligible(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and "lm_head" not in name and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=eligible)
