"""Which attention kernel for which step: the measurements behind sirocco's choices.

Pre-fill of 8 packed prompts (100..800 tokens, Mistral head shapes): the explicit dense mask (the reference
path) vs one SDPA call per sequence (sirocco's default) vs FlexAttention (if it compiles here).
Decode of 8 sequences over a 4096-slot cache: SDPA vs matmul + fp32 softmax with grouped query heads
(sirocco's decode kernel). Prints milliseconds and ratios; numbers vary +-20% run to run.

    python benchmarks/bench_attention.py [--dtype bfloat16] [--threads 2] [--flex]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sirocco.model.attention import decode_attention, dense_attention, per_sequence_attention
from sirocco.plan import BatchPlan


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    H, G, D, W = 32, 8, 128, 4096
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 801, (8,), generator=g).tolist()
    T = sum(lengths)
    q = torch.randn(T, H, D, dtype=dtype)
    k = torch.randn(T, G, D, dtype=dtype)
    v = torch.randn(T, G, D, dtype=dtype)
    plan = BatchPlan.build(lengths, windows=[W]).for_window(W)
    with torch.inference_mode():
        _ = plan.dense, plan.blocks                                # built once per step in real use
        dense = timed(lambda: dense_attention(q, k, v, plan.dense), repeats=2)
        per_seq = timed(lambda: per_sequence_attention(q, k, v, plan))
        print(f"pre-fill, 8 packed prompts ({T} tokens), {a.dtype}:")
        print(f"  dense mask (reference)   {dense:8.1f} ms")
        print(f"  per-sequence SDPA        {per_seq:8.1f} ms   {dense / per_seq:5.1f}x faster than dense")
        if a.flex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            seq, pos = plan.q_seq, plan.q_pos

            def mask_mod(b, h, qi, ki):
                return (seq[qi] == seq[ki]) & (pos[ki] <= pos[qi]) & (pos[ki] > pos[qi] - W)

            bm = create_block_mask(mask_mod, None, None, T, T, device="cpu")
            flex = torch.compile(flex_attention)
            qf, kf, vf = (x.transpose(0, 1)[None] for x in (q, k, v))
            ms = timed(lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True))
            print(f"  FlexAttention (compiled) {ms:8.1f} ms   {dense / ms:5.1f}x faster than dense")

        B, L = 8, W
        qd = torch.randn(B, H, D, dtype=dtype)
        kc = torch.randn(B, G, L, D, dtype=dtype)
        vc = torch.randn(B, G, L, D, dtype=dtype)
        valid = torch.ones(B, L, dtype=torch.bool)
        ours = timed(lambda: decode_attention(qd, kc, vc, valid))
        sdpa = timed(lambda: F.scaled_dot_product_attention(qd[:, :, None], kc, vc, attn_mask=valid[:, None, None],
                                                            enable_gqa=True))
        print(f"decode, {B} sequences x {L} cached keys, {a.dtype}:")
        print(f"  SDPA                     {sdpa:8.2f} ms")
        print(f"  matmul + fp32 softmax    {ours:8.2f} ms   {sdpa / ours:5.1f}x faster than SDPA")


if __name__ == "__main__":
    main()
