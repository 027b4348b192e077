"""The optimizer and its learning-rate schedule.

AdamW with weight decay on the matrices only (not on the norms' gains). The learning rate is a function of
the step alone, so resuming needs nothing but the step::

    lr
    peak |      ____
         |    /      ‾‾--__
         |  /               ‾‾--___
    min  |/                         ‾‾‾‾  (cosine from the end of warm-up to the last step)
         +---------------------------------- step
         0  warmup                     steps
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def learning_rate(step: int, peak: float, warmup: int, total: int, minimum: float) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps to ``peak``, then
    cosine decay to ``minimum`` at step ``total``; ``minimum`` after it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return minimum
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable ones of ``parameters``; matrices (embeddings, projections, router, experts)
    decay, vectors (RMSNorm gains) do not."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
