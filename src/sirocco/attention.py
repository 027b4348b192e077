"""Attention over packed sequences, lowered from the plan's mask to a kernel.

Notation: T new tokens in the step, Tk keys, H query heads, G = n_kv_heads, g = H // G query heads per kv head,
D head_dim, B sequences. Query head h reads kv head ``h // g``::

    query heads  0 1 2 3 | 4 5 6 7      (H = 8)
    kv heads        0    |    1         (G = 2, g = 4)

No kernel copies K/V to all heads: SDPA is called with ``enable_gqa=True`` and the decode kernel views the
queries as (G, g) groups.

Paths:
  * ``dense``: one SDPA call with the whole (T, Tk) boolean mask. The reference; supports backward.
  * ``per_sequence``: one SDPA call per sequence with its diagonal block (or ``is_causal`` where exact). On CPU
    this is far faster than the dense mask for several prompts; supports backward.
  * decode (one token per sequence, with a cache): matmul, fp32 softmax, matmul over the sequence's cache row
    in place, with the plan's valid-slot mask. SDPA takes a slow path for one bf16 query on CPU. With
    ``decode_kernel="native"`` the two products are the C++ kernels of csrc/decode_attention.cpp (fp32 scores
    straight from the bf16 cache, masked slots skipped): for 8 sequences of ~900 slots, 0.31 ms per layer
    against 1.41 in bf16, 0.55 against 1.88 in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels
from .cache import LayerCache
from .masks import Backend, DecodeKernel, WindowPlan


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, backend: Backend,
           cache: Optional[LayerCache] = None, decode_kernel: DecodeKernel = "matmul") -> torch.Tensor:
    """Attention of one layer for one step.

    Args:
        q: (T, H, D) rotated queries; k, v: (T, G, D) rotated keys and values of the new tokens.
        plan: the step's plan for this layer's window; backend: "dense" or "per_sequence".
        cache: the layer's cache, or None for a forward without cache.
        decode_kernel: for decode steps, "matmul" (PyTorch) or "native" (C++, where kernels.py serves it).
    Returns:
        (T, H, D)
    """
    if cache is not None and plan.decode:
        cache.write(k, v, plan)                       # the new token is written first, then attended to
        keys, values = cache.rows_view(plan)          # (B, G, L, D)
        if decode_kernel == "native" and native_decode_serves(q):
            return native_decode_attention(q, keys, values, plan.decode_valid)
        return decode_attention(q, keys, values, plan.decode_valid)
    keys, values = k, v
    if cache is not None:
        if plan.key_order is not None:               # later chunk: [cached prefix ; new] per sequence
            pk, pv = cache.prefix(plan)
            keys = torch.cat([pk, k])[plan.key_order]
            values = torch.cat([pv, v])[plan.key_order]
        cache.write(k, v, plan)
    if backend == "dense":
        return dense_attention(q, keys, values, plan.dense)
    return per_sequence_attention(q, keys, values, plan)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (T, H, D), k/v (Tk, G, D), mask (T, Tk) bool -> (T, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def per_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """One SDPA call per packed sequence, each with its own block of the mask. Shapes as ``dense_attention``."""
    if len(plan.q_seqlens) == 1:
        qs, ks, vs = [q], [k], [v]
    else:
        qs, ks, vs = q.split(plan.q_seqlens), k.split(plan.kv_seqlens), v.split(plan.kv_seqlens)
    outs = []
    for qb, kb, vb, block in zip(qs, ks, vs, plan.blocks):
        # 4-D inputs: with 3-D ones SDPA on CPU falls back to its math path (about 3x slower at 800 tokens).
        o = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None],
                                           vb.transpose(0, 1)[None], attn_mask=block, is_causal=block is None,
                                           enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cache row.

    q (B, H, D); k/v (B, G, L, D); valid (B, L) bool -> (B, H, D). Softmax in fp32.
    """
    B, H, D = q.shape
    G = k.shape[1]
    qg = q.view(B, G, H // G, D)                                             # (B, G, g, D)
    # Keys on the left (L rows, g columns): in bf16 this product is about 2x faster than q @ k^T (g rows).
    scores = torch.matmul(k, qg.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))   # (B, G, L, g)
    scores = scores.masked_fill(~valid[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-2).to(v.dtype)
    return torch.matmul(probs.transpose(-1, -2), v).view(B, H, D)


def native_decode_serves(q: torch.Tensor) -> bool:
    """Whether the C++ decode attention runs for these queries: CPU, no autograd, a served dtype and head_dim."""
    return q.device.type == "cpu" and not torch.is_grad_enabled() and kernels.native_serves(q.dtype, q.shape[-1])


def native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``decode_attention`` through the C++ kernels: fp32 scores (-inf on invalid slots), fp32 softmax, and the
    probabilities times the values accumulated in fp32. Same shapes."""
    native = kernels.native_module()
    scores = native.decode_scores(q.contiguous(), k, valid.contiguous(), 1.0 / math.sqrt(q.shape[-1]))  # (B, H, L)
    return native.decode_values(torch.softmax(scores, dim=-1), v)
