"""Attention over packed sequences: the cache traffic of a step, and the reference ops that compute it.

Notation: T new tokens in the step, Tk keys, H query heads, G = n_kv_heads, g = H // G query heads per kv head,
D head_dim, B sequences. Query head h reads kv head ``h // g``::

    query heads  0 1 2 3 | 4 5 6 7      (H = 8)
    kv heads        0    |    1         (G = 2, g = 4)

No kernel copies K/V to all heads: SDPA is called with ``enable_gqa=True`` and the decode product views the
queries as (G, g) groups.

``attend`` does what every backend shares (write the new keys to the cache, read a later chunk's cached prefix
back oldest first) and hands the arithmetic to an ``AttentionOps``. The reference ops here are plain PyTorch:

  * pre-fill ``"per_sequence"``: one SDPA call per sequence with its diagonal block of the mask (or
    ``is_causal`` where exact); supports backward. The default: on CPU far faster than a dense mask.
  * pre-fill ``"dense"``: one SDPA call with the whole (T, Tk) boolean mask; supports backward.
  * decode (one token per sequence, with a cache): matmul, fp32 softmax, matmul over the sequence's cache row
    in place, with the plan's valid-slot mask (SDPA takes a slow path for one bf16 query on CPU);
  * decode through maps (``decode_at``): several queries of one sequence (a draft to verify), or a ring larger
    than the window: each query reads its row and its keys in the plan's canonical order (``query_rows``,
    ``decode_slots``); the reference gathers them and runs the decode above.

A mixed step (decode tokens packed first, then pre-fill chunks) runs its two parts with their own ops
(``WindowPlan.parts``): a decode row gets the same attention bits as in a pure decode step.

A backend (backends/) subclasses ``AttentionOps`` to put kernels under ``rope`` and ``decode``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..cache import LayerCache
from ..plan import WindowPlan
from .rope import apply_rope

Prefill = Literal["per_sequence", "dense"]
PREFILL_PATHS: tuple[str, ...] = ("per_sequence", "dense")


class AttentionOps:
    """How RoPE and attention are computed: the reference, plain PyTorch (see the module's docstring).

    ``prefill`` is the pre-fill path, "per_sequence" or "dense"; decode always reads the cache rows in place.
    """

    def __init__(self, prefill: Prefill = "per_sequence"):
        if prefill not in PREFILL_PATHS:
            raise ValueError(f"unknown pre-fill attention path {prefill!r}; choose one of {PREFILL_PATHS}")
        self.prefill_path = prefill

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefill={self.prefill_path!r})"

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate queries or keys ``(T, heads, D)``; cos, sin ``(T, D // 2)``."""
        return apply_rope(x, cos, sin)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """q (T, H, D), k/v (Tk, G, D) in the plan's key order -> (T, H, D)."""
        if self.prefill_path == "dense":
            return dense_attention(q, k, v, plan.dense)
        return per_sequence_attention(q, k, v, plan)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
               fill: Sequence[int] | None = None) -> torch.Tensor:
        """q (B, H, D), k/v (B, G, L, D) cache rows, valid (B, L) -> (B, H, D). ``fill``: each query's count of
        valid keys, which are its first ones (the plan's ``decode_fill``)."""
        return decode_attention(q, k, v, valid)

    def decode_at(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                  valid: torch.Tensor, fill: Sequence[int] | None = None) -> torch.Tensor:
        """Decode over a whole layer cache: q (B, H, D), k/v (R, G, S, D), query b reads row ``rows[b]`` and its
        l-th key from slot ``slots[b, l]``; valid (B, L) -> (B, H, D). The same result as ``decode`` over the
        gathered keys."""
        keys = k[rows[:, None], :, slots].transpose(1, 2)                # (B, G, L, D)
        values = v[rows[:, None], :, slots].transpose(1, 2)
        return self.decode(q, keys, values, valid, fill)


REFERENCE_OPS = AttentionOps()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, cache: LayerCache | None,
           ops: AttentionOps) -> torch.Tensor:
    """Attention of one layer for one step.

    Args:
        q: (T, H, D) rotated queries; k, v: (T, G, D) rotated keys and values of the new tokens.
        plan: the step's plan for this layer's window.
        cache: the layer's cache, or None for a forward without cache.
        ops: computes the attention (``AttentionOps`` or a backend's subclass).
    Returns:
        (T, H, D)
    """
    if cache is not None and plan.parts is not None:
        # Mixed step: decode sequences (packed first) with the decode op, the others with the pre-fill op;
        # they own different cache rows, so the two halves' cache traffic is independent.
        dec, pre = plan.parts
        n = sum(dec.q_seqlens)
        return torch.cat([attend(q[:n], k[:n], v[:n], dec, cache, ops), attend(q[n:], k[n:], v[n:], pre, cache, ops)])
    if cache is not None and plan.decode:
        cache.write(k, v, plan)                       # the new tokens are written first, then attended to
        if plan.query_rows is not None:               # several queries per row, or a ring larger than the window
            return ops.decode_at(q, cache.k, cache.v, plan.query_rows, plan.decode_slots, plan.decode_valid,
                                 plan.decode_fill)
        keys, values = cache.rows_view(plan)          # (B, G, L, D)
        return ops.decode(q, keys, values, plan.decode_valid, plan.decode_fill)
    keys, values = k, v
    if cache is not None:
        if plan.key_order is not None:               # later chunk: [cached prefix ; new] per sequence
            pk, pv = cache.prefix(plan)
            keys = torch.cat([pk, k])[plan.key_order]
            values = torch.cat([pv, v])[plan.key_order]
        cache.write(k, v, plan)
    return ops.prefill(q, keys, values, plan)


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
    for qb, kb, vb, block in zip(qs, ks, vs, plan.blocks, strict=True):
        # 4-D inputs: with 3-D ones SDPA on CPU falls back to its math path instead of the flash kernel.
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
    # Keys on the left (L rows, g columns): in bf16 this product is faster than q @ k^T (g rows).
    scores = torch.matmul(k, qg.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))   # (B, G, L, g)
    scores = scores.masked_fill(~valid[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-2).to(v.dtype)
    return torch.matmul(probs.transpose(-1, -2), v).view(B, H, D)
