"""dsrun: declarative fine-tuning and training of DeepSeek-family models with Hydra and Lightning Fabric."""

import os

__version__ = "0.1.0"

# CPU tensors of 2 MiB and up on transparent huge pages. PyTorch's CPU allocator reads this once, at its first
# allocation, so it is set here, ahead of any torch import of a dsrun process. A small model's step allocates its
# vocabulary-sized logits and gradients afresh (30-70 MB each for the tiny model's 129k vocabulary), and faulting
# them in 4 KiB pages took a fifth of the default job's time on a 2-core CPU (BENCHMARKS.md, "CPU default job").
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
