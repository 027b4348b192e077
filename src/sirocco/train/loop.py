"""The training step and validation.

One optimizer step::

    for each of the step's ``accum`` micro-batches (B rows of T packed tokens):
        logits = model(tokens, document lengths)                  block-diagonal causal windowed attention
        loss   = sum of the cross-entropies / targets of the whole step
               + aux_loss_coef * mean over MoE layers of the load balance / accum
        loss.backward()                                           gradients accumulate
    clip the gradient norm; set the step's learning rate; AdamW step; zero the gradients

Dividing by the targets of the whole step makes the accumulated gradient that of one batch ``accum`` times
larger. The cross-entropy is computed in fp32 also under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..model import Transformer
from .data import Batch, DataPosition, PackedStream
from .losses import cross_entropy_sum, mean_load_balancing_loss
from .recipe import TrainRecipe
from .schedule import build_optimizer, learning_rate, set_learning_rate


@dataclass
class StepResult:
    step: int               # steps done after this one
    loss: float             # cross-entropy per target token of the step
    aux: float              # the weighted load-balancing term (0 for dense models)
    grad_norm: float        # before clipping
    lr: float
    tokens: int             # tokens processed (inputs, filler included)
    seconds: float


def use_autocast(mode: str, device: torch.device) -> bool:
    """"bf16" always, "off" never, "auto" on CUDA only. On this project's 2-core AVX512-BF16 CPU, bf16 autocast
    made a 4.7M-parameter dense model train about 1.5x faster (4.6k -> 7.1k tokens/s) but a 4-expert MoE of
    the same size no faster (its many small per-expert products): recipes choose it where it helps. Tests use
    fp32 for exact comparisons."""
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


class Trainer:
    """Owns the optimizer, the step counter and the data position of one run.

    Args:
        model: the Transformer to train (in fp32; autocast handles bf16).
        recipe: the [train] section.
        stream: the training batches; val: fixed validation batches.
    """

    def __init__(self, model: Transformer, recipe: TrainRecipe, stream: PackedStream, val: list[Batch]):
        self.model, self.recipe, self.stream, self.val = model, recipe, stream, val
        self.device = model.device
        self.optimizer = build_optimizer(model.parameters(), recipe.lr, recipe.weight_decay, (recipe.beta1, recipe.beta2))
        self.autocast = use_autocast(recipe.autocast, self.device)
        self.step = 0
        self.position = DataPosition()
        moe = model.args.moe
        self.top_k = moe.num_experts_per_tok if moe is not None else 0

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Summed cross-entropy of a micro-batch's targets, and the mean load balance of its MoE layers."""
        batch = batch.to(self.device)
        router: Optional[list] = [] if self.top_k else None
        with self._context():
            logits = self.model(batch.tokens.flatten(), batch.lengths, router_logits=router)   # (B*T, V)
        ce = cross_entropy_sum(logits, batch.targets.flatten())
        aux = mean_load_balancing_loss(router, self.top_k) if router else None
        return ce, aux

    def train_step(self) -> StepResult:
        """One optimizer step over the next ``accum`` micro-batches."""
        t0 = time.perf_counter()
        r = self.recipe
        self.model.train()
        batches = []
        for _ in range(r.accum):
            batch, self.position = self.stream.next(self.position)
            batches.append(batch)
        count = max(1, sum(b.num_targets for b in batches))
        ce_total = aux_total = 0.0
        for batch in batches:
            ce, aux = self.forward(batch)
            loss = ce / count
            if aux is not None and r.aux_loss_coef:
                weighted = r.aux_loss_coef * aux / r.accum
                loss = loss + weighted
                aux_total += float(weighted.detach())
            loss.backward()
            ce_total += float(ce.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        if r.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, r.clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lr = learning_rate(self.step, r.lr, r.warmup, r.steps, r.min_lr)
        set_learning_rate(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(self.step, ce_total / count, aux_total, norm, lr,
                          sum(b.num_tokens for b in batches), time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Cross-entropy per target token over the validation batches (nan without any)."""
        if not self.val:
            return math.nan
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val:
            ce, _ = self.forward(batch)
            total += float(ce)
            count += batch.num_targets
        self.model.train()
        return total / max(1, count)
