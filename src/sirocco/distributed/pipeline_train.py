"""Pipeline-parallel training: the model's stages on several ranks, driven by a ``torch.distributed.pipelining``
schedule (GPipe, or 1F1B which holds fewer micro-batches' activations at once).

A step's micro-batches, stacked, are one batch of B rows of T tokens; each row packs whole documents back to back,
and ``positions`` (B, T) gives each token's position in its document (0 where a document starts), so every stage
can rebuild the documents' block-diagonal causal mask on its own: the positions travel to every stage as a keyword
argument, the activations (b, T, dim) from stage to stage. The schedule cuts the B rows back into the
micro-batches along dimension 0:

    rows  [r0 r1 | r2 r3 | r4 r5 | r6 r7]   B = 8, 4 micro-batches of 2 rows
    GPipe (2 stages):   rank 0  F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3        (F forward, B backward)
                        rank 1  .  F0 F1 F2 F3 B0 B1 B2 B3 .

The loss is computed on the last stage: the sum of the cross-entropies of the batch's target tokens divided by
their count over the *whole batch*, so the gradients accumulated over the micro-batches are those of the
token-mean loss of the batch, exactly as a single process accumulating the same micro-batches (and independent
of how the rows are cut). Gradients accumulate into each stage's ``.grad``; the optimizer is the caller's,
one per rank over its stage's parameters (element-wise optimizers such as AdamW then match a single process;
clip the gradient norm with ``clip_grad_norm_`` here, which sums over all stages).

Mixtral's load-balancing loss lives where the router logits are, on each stage: a stage adds its layers' term
to its own backward pass (``_AddAuxLoss``), so no router logits travel between ranks.

``sirocco train --pipeline-ranks N`` under torchrun runs the training loop of ``sirocco.train.run`` on every
rank with a ``PipelinePlace``: every rank reads the corpus and packs the same (seeded) batches, rank 0 opens or
trains the tokenizer and the others read its file, each rank builds or loads only its stage, and
``PipelineStep`` runs a step's ``accum`` micro-batches through the schedule. Checkpoints are the files one
process writes, gathered and written by rank 0, without ``optimizer.pt``: not (yet) in a pipeline are --resume
(the optimizer state is per rank) and bf16 autocast (the stages train in fp32).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ..backends import reference
from ..model import Transformer
from ..model.attention import Prefill
from ..train.data import Batch
from ..train.loop import use_autocast
from ..train.losses import IGNORE_INDEX, BatchTokenLoss, cross_entropy_sum, document_lengths, load_balancing_loss
from ..train.recipe import Recipe
from .launch import DistContext, agree, peer_errors
from .run import shared_from_rank0
from .stages import rank_stage

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class _AddAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also sends a gradient of 1 into ``aux``: a stage's own loss
    term (the MoE load balance of its layers) joins the backward pass that the last stage's loss starts,
    without travelling between ranks."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``note()`` when the gradient reaches it: placed at a stage's output it marks
    the start of the stage's backward of a micro-batch, at its input the end."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, note: Callable[[], None]) -> torch.Tensor:
        ctx.note = note
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.note()
        return grad, None


class TrainStage(nn.Module):
    """A pipeline stage for training: (b, T) token ids or (b, T, dim) activations, plus (b, T) positions ->
    (b, T, dim) activations, or (b, T, vocab) logits on the last stage.

    With ``aux_loss_coef`` and MoE layers, each micro-batch adds ``coef * mean over the model's layers of the
    load-balancing loss / n_microbatches`` (summed over micro-batches: the batch's mean) through
    ``_AddAuxLoss``; ``aux_values`` keeps the detached terms for reporting.

    With ``events`` set to a list (None, the default, records nothing), each micro-batch's forward and backward
    on this stage append ``(kind "F" or "B", micro-batch, start, end)`` in ``time.perf_counter()`` seconds, which
    one machine's processes share (for ``sirocco viz pipeline``)."""

    def __init__(self, stage: Transformer, aux_loss_coef: float = 0.0, n_microbatches: int = 1):
        super().__init__()
        self.stage = stage
        moe = stage.args.moe
        self.aux_scale = aux_loss_coef / (stage.args.n_layers * n_microbatches) if moe and aux_loss_coef else 0.0
        self.top_k = moe.num_experts_per_tok if moe else 0
        self.aux_values: list[torch.Tensor] = []
        self.events: list[tuple[str, int, float, float]] | None = None
        self._forwards = 0                   # micro-batches seen by forward since the events were set

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.events is None:
            return self._forward(x, positions)
        mb, t0, began = self._forwards, time.perf_counter(), [0.0]
        self._forwards += 1
        events = self.events

        def backward_begins() -> None:
            began[0] = time.perf_counter()

        def backward_ends() -> None:
            events.append(("B", mb, began[0], time.perf_counter()))

        if x.is_floating_point():
            x = _Mark.apply(x, backward_ends)
            hook = None
        else:                                # ids: mark the embedding's output instead
            assert self.stage.tok_embeddings is not None, "token ids reach only the first stage"
            hook = self.stage.tok_embeddings.register_forward_hook(
                lambda _m, _i, out: _Mark.apply(out, backward_ends))
        try:
            h = self._forward(x, positions)
        finally:
            if hook is not None:
                hook.remove()
        events.append(("F", mb, t0, time.perf_counter()))
        return _Mark.apply(h, backward_begins)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, T = positions.shape
        plan = self.stage.plan(document_lengths(positions))
        flat = x.reshape(b * T, *x.shape[2:])                     # (b*T,) ids or (b*T, dim)
        router: list | None = [] if self.aux_scale else None
        h = self.stage(flat, plan, router_logits=router)
        if router:
            aux = self.aux_scale * torch.stack([load_balancing_loss(r, self.top_k) for r in router]).sum()
            self.aux_values.append(aux.detach())
            h = _AddAuxLoss.apply(h, aux)
        return h.view(b, T, -1)


class PipelineStep:
    """This rank's stage of a model trained over a pipeline: the training loop's step function
    (``sirocco.train.loop.StepFunction``), one per rank, all built with the same arguments. A step's
    micro-batches go through the pipeline schedule; validation runs forward only, activations sent rank to rank.
    Every value it returns is the same on every rank.

    Args:
        stage: this rank's ``Transformer`` stage (trainable parameters, on ``ctx.device``).
        ctx: the rank's ``DistContext``.
        n_microbatches: micro-batches per step (the recipe's ``accum``).
        schedule: "gpipe" (all forwards, then all backwards) or "1f1b" (one forward, one backward in the
            steady state: activations of at most ``world_size`` micro-batches alive at once).
        attention: pre-fill attention path ("per_sequence" or "dense"; both have a backward on the CPU), set on
            the stage's attention layers.
        aux_loss_coef: weight of the MoE load-balancing loss (mean over layers and micro-batches); 0 for none.

    >>> step_fn = PipelineStep(stage, ctx, n_microbatches=4)                              # doctest: +SKIP
    >>> ce, aux, tokens = step_fn.train_step(micro_batches); opt.step(); opt.zero_grad()  # doctest: +SKIP
    """

    def __init__(self, stage: Transformer, ctx: DistContext, n_microbatches: int = 4,
                 schedule: Literal["gpipe", "1f1b"] = "gpipe", attention: Prefill = "per_sequence",
                 aux_loss_coef: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        self.stage, self.ctx, self.args = stage, ctx, stage.args
        reference.attach(stage, attention)
        self.module = TrainStage(stage, aux_loss_coef, n_microbatches)
        self.n_microbatches = n_microbatches
        self.schedule_name = schedule
        self.loss_fn = BatchTokenLoss()
        # A stage and its schedule are fixed to the first shape they see: keep one per batch shape.
        self._schedules: dict[tuple[int, int], PipelineScheduleSingle] = {}

    def _schedule(self, shape: tuple[int, int]) -> PipelineScheduleSingle:
        if shape not in self._schedules:
            # Shapes given up front (on the meta device): the stage then skips its shape-inference pass, an
            # extra forward over the first batch (on empty buffers beyond the first stage).
            rows, cols = shape[0] // self.n_microbatches, shape[1]
            args, dtype = self.stage.args, next(self.stage.parameters()).dtype

            def meta(*size: int, dtype: torch.dtype = dtype, grad: bool = True) -> torch.Tensor:
                return torch.empty(size, dtype=dtype, device="meta").requires_grad_(grad)
            inputs = meta(rows, cols, dtype=torch.long, grad=False) if self.ctx.is_first else meta(rows, cols, args.dim)
            outputs = meta(rows, cols, args.vocab_size if self.ctx.is_last else args.dim)
            pstage = PipelineStage(self.module, self.ctx.rank, self.ctx.world_size, self.ctx.device,
                                   input_args=inputs, output_args=outputs)
            # scale_grads=False: the loss is already normalised by the batch's token count.
            self._schedules[shape] = SCHEDULES[self.schedule_name](
                pstage, n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False)
            log.debug("rank %d: new %s schedule for batches of shape %s", self.ctx.rank, self.schedule_name, shape)
        return self._schedules[shape]

    def train_step(self, batches: list[Batch]) -> tuple[float, float, int]:
        """Accumulate the gradients of one step into the stage's parameters.

        Args:
            batches: the step's ``n_microbatches`` micro-batches, each (b, T), the same on every rank (the first
                stage reads the tokens, the last the targets, every stage the positions).
        Returns, on every rank:
            (mean cross-entropy per target token of the step, the load-balancing term (0 without), tokens).
        """
        shapes = {tuple(t.shape) for b in batches for t in (b.tokens, b.targets, b.positions)}
        if len(batches) != self.n_microbatches or len(shapes) != 1:
            raise ValueError(f"a step needs {self.n_microbatches} micro-batches of tokens, targets and positions "
                             f"of one (rows, tokens) shape; got {len(batches)} with shapes {sorted(shapes)}")
        ctx = self.ctx
        dev = ctx.device
        # One (n_microbatches * b, T) batch, which the schedule cuts back into the micro-batches.
        tokens, targets, positions = (torch.cat([getattr(b, k) for b in batches])
                                      for k in ("tokens", "targets", "positions"))
        positions = positions.to(dev)
        B, T = positions.shape
        self.loss_fn.count = max(1, int((targets != IGNORE_INDEX).sum()))
        schedule = self._schedule((B, T))
        losses: list[torch.Tensor] = []
        args = (tokens.to(dev),) if ctx.is_first else ()
        kwargs: dict[str, Any] = dict(target=targets.to(dev), losses=losses) if ctx.is_last else {}
        self.module.aux_values.clear()
        with peer_errors(ctx, "running the pipeline schedule"):
            schedule.step(*args, positions=positions, **kwargs)
        # [cross-entropy (last rank), load balance (this rank's layers)], summed over the ranks.
        parts = torch.zeros(2, device=dev)
        if ctx.is_last:
            parts[0] = torch.stack(losses).sum().detach().float()
        if self.module.aux_values:        # one per micro-batch (the last ones, should a warm-up forward add any)
            parts[1] = torch.stack(self.module.aux_values[-self.n_microbatches:]).sum().float()
        with peer_errors(ctx, "summing the loss"):
            dist.all_reduce(parts)
        ce, aux = parts.tolist()
        return ce, aux, sum(b.num_tokens for b in batches)

    @torch.no_grad()
    def eval_sum(self, batch: Batch) -> float:
        ctx, stage = self.ctx, self.stage
        plan = stage.plan(document_lengths(batch.positions))
        with peer_errors(ctx, "passing validation activations"):
            if ctx.is_first:
                x = batch.tokens.flatten().to(ctx.device)
            else:
                x = torch.empty(batch.tokens.numel(), stage.args.dim, device=ctx.device)
                dist.recv(x, src=ctx.rank - 1)
            h = stage(x, plan)
            if not ctx.is_last:
                dist.send(h.float().contiguous(), dst=ctx.rank + 1)
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        if ctx.is_last:
            total += float(cross_entropy_sum(h, batch.targets.flatten().to(ctx.device)))
        with peer_errors(ctx, "sharing the validation loss"):
            dist.broadcast(total, src=ctx.world_size - 1)
        return float(total)

    def train(self, mode: bool = True) -> None:
        self.stage.train(mode)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.stage.parameters() if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so that the norm over *all* stages is at most ``max_norm`` (as
        ``torch.nn.utils.clip_grad_norm_`` on the whole model); returns that norm before clipping."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        with peer_errors(self.ctx, "summing the gradient norm"):
            dist.all_reduce(sq)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return float(total)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(self.stage, self.ctx)

    def num_parameters(self) -> int:
        n = torch.tensor(sum(p.numel() for p in self.stage.parameters()), dtype=torch.int64, device=self.ctx.device)
        with peer_errors(self.ctx, "counting the parameters"):
            dist.all_reduce(n)
        return int(n)


class PipelinePlace:
    """The training loop's place (``sirocco.train.run.Place``) on one rank of a pipeline: rank 0 reports and
    writes, the model is this rank's stage. Every rank checks first that all train the same recipe."""

    resume_refused: str | None = ("--resume is not available with --pipeline-ranks yet (the optimizer state is "
                                     "per rank); resume in one process, or start a new run")

    def __init__(self, ctx: DistContext, recipe: Recipe, schedule: Literal["gpipe", "1f1b"] = "gpipe"):
        agree(ctx, "recipe", recipe.to_toml())
        if use_autocast(recipe.train.autocast, ctx.device):
            log.warning("bf16 autocast is not used in a pipeline: the stages train in fp32")
        self.ctx, self.schedule = ctx, schedule
        self.is_reporter = ctx.rank == 0
        self.label = f" ({ctx.world_size} ranks)"

    def shared(self, fn: Callable[[], T], what: str) -> T:
        return shared_from_rank0(self.ctx, fn, what)

    def build(self, recipe: Recipe, out: Path, vocab_size: int, init: Path | None, resume: bool) -> PipelineStep:
        stage = rank_stage(self.ctx, init if init is not None else recipe.model_args(vocab_size), seed=recipe.seed)
        stage.train()
        for p in stage.parameters():
            p.requires_grad_(True)
        return PipelineStep(stage, self.ctx, n_microbatches=recipe.train.accum, schedule=self.schedule,
                            aux_loss_coef=recipe.train.aux_loss_coef)

    def barrier(self, what: str) -> None:
        with peer_errors(self.ctx, what):
            dist.barrier()

    def summary(self, history: dict[str, list]) -> dict[str, Any]:
        return {"pipeline_ranks": self.ctx.world_size, "history": history}


# -- checkpoints ---------------------------------------------------------------------------------------------
def gather_state_dict(stage: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (CPU tensors, checkpoint names), None on the other ranks.

    Each rank announces its tensors' names, shapes and dtypes, then sends them to rank 0 one by one; rank 0
    holds the whole model once (as a single process saving it would)."""
    mine = {k: v.detach() for k, v in stage.state_dict().items()}
    meta = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in mine.items()}
    metas: list[Any] = [None] * ctx.world_size
    with peer_errors(ctx, "gathering the checkpoint"):
        dist.all_gather_object(metas, meta)
        names = [k for m in metas for k in m]
        if len(names) != len(set(names)):
            dup = sorted({k for k in names if names.count(k) > 1})
            raise ValueError(f"tensors held by more than one stage: {dup[:5]}")
        if ctx.rank != 0:
            for name in sorted(mine):
                dist.send(mine[name].contiguous(), dst=0)
            return None
        full = {k: v.cpu().clone() for k, v in mine.items()}
        for r in range(1, ctx.world_size):
            for name in sorted(metas[r]):
                shape, dtype = metas[r][name]
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=ctx.device)
                dist.recv(buf, src=r)
                full[name] = buf.cpu()
    return full

