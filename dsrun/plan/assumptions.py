"""What the planner assumes (each argued, and where possible measured, in docs/planner.md), and the fixed names it
counts by."""

from __future__ import annotations

GIB = 2**30

MFU = {"consumer": 0.30, "datacenter": 0.32}  # H100 anchor: 31.6 % eager (dense 1.5B, bf16 autocast)
MOE_EFFICIENCY = 0.25  # H100 anchor: MoE 7.9 % MFU on active parameters vs 31.6 % dense
FP8_EFFICIENCY = 0.6  # fp8 reaches 1.2x bf16's throughput, not 2x (scaling and casts)
CPU_FLOPS_PER_CORE, CPU_MFU, CPU_MEMORY_GBS = 160e9, 0.4, 50.0  # AVX-512 FMA at 2.5 GHz; DDR4/5 dual channel
CUDA_CONTEXT_GIB, NCCL_GIB = 0.5, 0.25
ALLOCATOR_FRACTION = 0.10  # of what a step allocates and frees: the caching allocator's reserved-but-unused
TRANSIENT = ("activations", "logits_loss", "compute_copy", "gathered", "gradients", "kv_cache", "working_set")
LINK_EFFICIENCY = 0.8  # of a link's one-way bandwidth, in NCCL rings and host copies
DECODE_BANDWIDTH_EFFICIENCY = 0.7
# Eager PyTorch runs Python and launches kernels per op; a small step waits on that instead of the GPU. H100 host,
# 1.5B shape: 3.0-4.5 ms per decoder block forward, x1.2 under autocast, +1.3-2.3 ms with LoRA adapters, varying
# that much from call to call (BENCHMARKS.md); the middle of that range
HOST_BLOCK_FORWARD_S, HOST_AUTOCAST_FACTOR, HOST_LORA_BLOCK_S = 3.8e-3, 1.2, 1.8e-3
HOST_MOE_FACTOR, HOST_COMPILED_FACTOR = 2.0, 0.3
STEP_BANDWIDTH_EFFICIENCY = 0.7  # of HBM bandwidth, in the optimizer step's and the norm's streaming kernels
# FSDP2 offload copies every block's weights in from host RAM on a side stream; the caching allocator reuses those
# buffers only after a sync, so it holds one more gathered working set (7B bf16 on a 24 GB cap: 4.7 GiB allocated,
# 11.2 reserved; 1.5B mixed: 9.3 allocated, 14.5 reserved)
OFFLOAD_GATHERED_COPIES = 1.0
HOST_POWER_FACTOR = 1.3  # wall power of the box per watt of GPU TDP (CPU, fans, PSU losses)
NETWORK_GBPS = {"ethernet": 2.5, "infiniband": 400.0}  # a consumer cluster's 2.5 GbE switch; one NDR port per GPU
COLLECTIVE_LATENCY_S = {"nvlink": 10e-6, "pcie": 30e-6, "network": 100e-6}
DEEPSPEED_BUCKET_ELEMENTS = 5e8  # reduce_bucket_size (strategy.deepspeed_config); allgather bucket: DeepSpeed default
TP_PROJECTIONS = tuple(f"{m}.{p}_proj" for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                       for p in ps)
