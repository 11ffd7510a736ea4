"""GPU probe: packed-document attention kernels, forward + backward of one layer's attention, on one GPU.

R1-Distill-Qwen-1.5B heads (12 query, 2 KV, dim 128), 4 rows x 2048 tokens, documents of random length (64-900
tokens) packed into each row: causal SDPA over whole rows (no document mask: the unmasked-packing baseline), the
variable-length flash kernel dsrun uses (ATen's `_flash_attention_forward`, grouped KV heads), the public
`torch.nn.attention.varlen.varlen_attn` where this torch's signature takes grouped KV heads, SDPA with the boolean
block-diagonal mask (what transformers builds from restarting position ids), compiled FlexAttention with a document
block mask. 3 warm-up calls, then the mean of 20, CUDA-synchronised.

    python bench/attention.py
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F

ROWS, SEQ, HEADS, KV_HEADS, DIM, CALLS = 4, 2048, 12, 2, 128, 20


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn

    torch.manual_seed(0)
    device = torch.device("cuda")
    lengths = []
    for _ in range(ROWS):
        left = SEQ
        while left:
            lengths.append(min(left, int(torch.randint(64, 900, ()))))
            left -= lengths[-1]
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(device)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(ROWS, heads, SEQ, DIM, device=device, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = tensor(HEADS), tensor(KV_HEADS), tensor(KV_HEADS)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(ROWS * SEQ, t.shape[1], DIM)

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device)).view(ROWS, SEQ)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=device).tril()
    mask = ((document[:, :, None] == document[:, None, :]) & causal)[:, None]
    block_mask = create_block_mask(lambda b, h, i, j: (document[b, i] == document[b, j]) & (i >= j),
                                   ROWS, None, SEQ, SEQ, device=device)
    flex = torch.compile(flex_attention)
    cases = {
        "sdpa_causal_unpacked": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "varlen_flash_aten (dsrun)": lambda: torch.ops.aten._flash_attention_forward(
            flat(q), flat(k), flat(v), offsets, offsets, SEQ, SEQ, 0.0, True, False)[0],
        "sdpa_boolean_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "flex_compiled_block_mask": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
    }
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:  # torch >= 2.12
        cases["varlen_attn_public"] = lambda: varlen_attn(flat(q), flat(k), flat(v), offsets, offsets, SEQ, SEQ,
                                                          window_size=(-1, 0), enable_gqa=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {len(lengths)} documents in "
          f"{ROWS} x {SEQ} tokens")
    print("| kernel | ms per forward + backward |\n|---|---|")
    for name, fn in cases.items():
        for _ in range(3):
            fn().float().sum().backward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn().float().sum().backward()
        torch.cuda.synchronize()
        print(f"| {name} | {(time.perf_counter() - start) / CALLS * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
