"""Rotary position embeddings in Mistral's layout: adjacent pairs (x[2i], x[2i+1]) of each head rotate together."""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles: two (max_seq_len, head_dim // 2) fp32 tables."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by the position's angle i.

    x: (T, heads, D); cos, sin: (T, D // 2) fp32. Computed in fp32, returned in x's dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))                    # (T, heads, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]                   # (T, 1, D/2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)
