"""The training step and validation, written once for every place a model trains.

One optimizer step::

    for each of the step's ``accum`` micro-batches (B rows of T packed tokens):
        logits = model(tokens, document lengths)                  block-diagonal causal windowed attention
        loss   = sum of the cross-entropies / targets of the whole step
               + aux_loss_coef * mean over MoE layers of the load balance / accum
        loss.backward()                                           gradients accumulate
    clip the gradient norm; set the step's learning rate; AdamW step; zero the gradients

Dividing by the targets of the whole step makes the accumulated gradient that of one batch ``accum`` times
larger. The cross-entropy is computed in fp32 also under bf16 autocast.

The forward and backward passes are a ``StepFunction``'s: ``LocalStep`` here (the whole model in this process),
or ``sirocco.distributed.pipeline_train.PipelineStep`` (this rank's stage of a pipeline). ``Trainer`` does the
rest (batches, clipping, learning rate, optimizer) and ``evaluate`` the validation, the same for both.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..config import ModelArgs
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


class StepFunction(Protocol):
    """What the loop needs of the model it trains, wherever its layers are. Every method is called on every
    rank of a pipeline in the same order (they may communicate)."""

    args: ModelArgs

    def train_step(self, batches: list[Batch]) -> tuple[float, float, int]:
        """Forward and backward of a step's micro-batches, gradients accumulated into ``parameters()``:
        (cross-entropy per target token of the step, weighted load-balancing term, tokens)."""

    def eval_sum(self, batch: Batch) -> float:
        """Summed cross-entropy of the batch's targets, forward only, without gradients."""

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation mode, as ``nn.Module.train``."""

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters held here, in the module's order (the optimizer's)."""

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients to a norm of ``max_norm`` over the whole model; the norm before clipping."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors where the checkpoint is written (rank 0), None elsewhere."""

    def num_parameters(self) -> int:
        """Parameters of the whole model."""


def use_autocast(mode: str, device: torch.device) -> bool:
    """"bf16" always, "off" never, "auto" on CUDA only. On a CPU with AVX512-BF16 it speeds up dense models
    but not small-expert MoEs (many small per-expert products), so recipes choose it; tests use fp32 for exact
    comparisons."""
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


class LocalStep:
    """The step function of a whole model in this process: micro-batches one after the other, bf16 autocast
    if the recipe asks for it, the MoE load-balancing loss.

    Args:
        model: the Transformer to train (in fp32; autocast handles bf16).
        recipe: the [train] section (autocast, aux_loss_coef).
    """

    def __init__(self, model: Transformer, recipe: TrainRecipe):
        self.model, self.args, self.device = model, model.args, model.device
        self.autocast = use_autocast(recipe.autocast, self.device)
        self.aux_loss_coef = recipe.aux_loss_coef
        moe = model.args.moe
        self.top_k = moe.num_experts_per_tok if moe is not None else 0

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed cross-entropy of a micro-batch's targets, and the mean load balance of its MoE layers."""
        batch = batch.to(self.device)
        router: list | None = [] if self.top_k else None
        with self._context():
            logits = self.model(batch.tokens.flatten(), batch.lengths, router_logits=router)   # (B*T, V)
        ce = cross_entropy_sum(logits, batch.targets.flatten())
        aux = mean_load_balancing_loss(router, self.top_k) if router else None
        return ce, aux

    def train_step(self, batches: list[Batch]) -> tuple[float, float, int]:
        self.model.train()
        count = max(1, sum(b.num_targets for b in batches))
        ce_total = aux_total = 0.0
        for batch in batches:
            ce, aux = self.forward(batch)
            loss = ce / count
            if aux is not None and self.aux_loss_coef:
                weighted = self.aux_loss_coef * aux / len(batches)
                loss = loss + weighted
                aux_total += float(weighted.detach())
            loss.backward()
            ce_total += float(ce.detach())
        return ce_total / count, aux_total, sum(b.num_tokens for b in batches)

    def eval_sum(self, batch: Batch) -> float:
        with torch.no_grad():
            return float(self.forward(batch)[0])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@torch.no_grad()
def evaluate(step_fn: StepFunction, batches: list[Batch]) -> float:
    """Cross-entropy per target token over ``batches`` (nan without any)."""
    if not batches:
        return math.nan
    step_fn.train(False)
    total, count = 0.0, 0
    for batch in batches:
        total += step_fn.eval_sum(batch)
        count += batch.num_targets
    step_fn.train(True)
    return total / max(1, count)


class Trainer:
    """Owns the optimizer, the step counter and the data position of one run.

    Args:
        step_fn: the model's forward and backward passes (``LocalStep``, or a pipeline's ``PipelineStep``).
        recipe: the [train] section.
        stream: the training batches; val: fixed validation batches.
    """

    def __init__(self, step_fn: StepFunction, recipe: TrainRecipe, stream: PackedStream, val: list[Batch]):
        self.step_fn, self.recipe, self.stream, self.val = step_fn, recipe, stream, val
        self.optimizer = build_optimizer(step_fn.parameters(), recipe.lr, recipe.weight_decay,
                                         (recipe.beta1, recipe.beta2))
        self.step = 0
        self.position = DataPosition()

    def train_step(self) -> StepResult:
        """One optimizer step over the next ``accum`` micro-batches."""
        t0 = time.perf_counter()
        r = self.recipe
        batches = []
        for _ in range(r.accum):
            batch, self.position = self.stream.next(self.position)
            batches.append(batch)
        loss, aux, tokens = self.step_fn.train_step(batches)
        norm = self.step_fn.clip_grad_norm_(r.clip if r.clip > 0 else math.inf)     # inf: measured, not clipped
        lr = learning_rate(self.step, r.lr, r.warmup, r.steps, r.min_lr)
        set_learning_rate(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(self.step, loss, aux, norm, lr, tokens, time.perf_counter() - t0)

    def evaluate(self) -> float:
        """Cross-entropy per target token over the validation batches (nan without any)."""
        return evaluate(self.step_fn, self.val)
