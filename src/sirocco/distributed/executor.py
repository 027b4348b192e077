"""Sharded generation: an executor for the engine of ``sirocco.generate`` whose model is split into pipeline stages.

Every rank runs the same engine loop (admission, chunking, stopping, row compaction) on the same host integers,
so every rank builds the same ``BatchPlan`` each step and nothing but activations and sampled tokens travels:

    rank 0: tokens -> embedding + its layers ---h (T, dim)---> rank 1: its layers ---h---> ... last rank:
    its layers -> norm -> output -> logits -> sample (one generator per sequence) --tokens, logprobs--> all ranks

The shape of each hidden state follows from the plan (T = the step's token count), so receivers size their
buffers without asking. The next tokens are chosen once, on the last rank, and broadcast with their
log-probabilities, so every rank appends the same tokens and makes the same stop decisions.

Micro-batches: a step with several sequences is cut into groups of whole sequences (balanced by tokens), each
with its own plan. Rank r computes group m while rank r+1 computes group m-1, so stages overlap instead of
waiting for each other's whole step:

    without:  rank 0 [ g0 g1 ]                 with:  rank 0 [g0][g1]
              rank 1          [ g0 g1 ]               rank 1     [g0][g1]

Sequences never attend across groups and each owns its cache row, so a group's results are those of the whole
step (per-sequence attention, per-token MoE routing); only the matrix products see smaller batches.

Splitting pays only where a step is compute-bound. A decode step of a few sequences is bound by reading the
weights, and each group reads them again, so a step is split only into groups of at least ``min_group_tokens``
tokens (default 64, where the measured time per row stopped falling: docs/performance.md): pre-fill chunks
nearly always, decode only with many rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..cache import RollingCache
from ..generate.sampling import RowSampling, Sampled, sample
from ..model import Transformer
from ..plan import BatchPlan
from .launch import DistContext, peer_errors

log = logging.getLogger(__name__)


def split_groups(lengths: list[int], n_groups: int, min_tokens: int = 1) -> list[tuple[int, int]]:
    """Cut sequences (in packing order) into at most ``n_groups`` contiguous non-empty groups with about
    equal token counts, and no more groups than ``sum(lengths) // min_tokens``; returns (first, end) sequence
    indices.

    >>> split_groups([1, 1, 1, 1], 2), split_groups([9, 1, 1, 1], 2), split_groups([3], 4)
    ([(0, 2), (2, 4)], [(0, 1), (1, 4)], [(0, 1)])
    >>> split_groups([1] * 8, 2, min_tokens=64), split_groups([64, 64], 4, min_tokens=64)
    ([(0, 8)], [(0, 1), (1, 2)])
    """
    n = max(1, min(n_groups, len(lengths), sum(lengths) // max(1, min_tokens)))
    total = sum(lengths)
    bounds: list[tuple[int, int]] = []
    acc = start = 0
    for i, length in enumerate(lengths):
        acc += length
        left_groups = n - len(bounds) - 1            # groups still to open after this one
        left_seqs = len(lengths) - i - 1
        if left_groups and (acc >= total * (len(bounds) + 1) / n or left_seqs == left_groups):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(lengths)))
    return bounds


class PipelineExecutor:
    """Runs each engine step on this rank's pipeline stage; one per rank, all engines with the same arguments.

    Args:
        stage: this rank's ``Transformer`` (built with ``layers=...``, ``embed`` on rank 0, ``head`` on the last).
        ctx: the rank's ``DistContext`` (``init_distributed``).
        micro_batches: most groups of sequences per step that flow through the stages concurrently (default:
            the number of stages; 1 turns the overlap off).
        min_group_tokens: a step is cut only into groups of at least this many tokens (see above).

    >>> engine = Engine(stage, tokenizer, executor=PipelineExecutor(stage, ctx), max_rows=8)   # doctest: +SKIP

    Every rank's ``Engine.generate`` / ``stream`` then returns the same completions (the tokenizer is needed on
    every rank: stop strings are checked on every rank).
    """

    def __init__(self, stage: Transformer, ctx: DistContext, micro_batches: int | None = None,
                 min_group_tokens: int = 64):
        self.model = stage
        self.ctx = ctx
        self.micro_batches = max(1, int(micro_batches if micro_batches is not None else ctx.world_size))
        self.min_group_tokens = min_group_tokens
        self._check_stage(stage)
        param = next(stage.parameters())
        self.device, self.dtype = param.device, param.dtype
        # sends not yet known complete, with their buffers
        self._inflight: list[tuple[dist.Work | None, torch.Tensor]] = []

    def _check_stage(self, stage: Transformer) -> None:
        has_embed, has_head = stage.tok_embeddings is not None, stage.output is not None
        if has_embed != self.ctx.is_first or has_head != self.ctx.is_last:
            raise ValueError(f"rank {self.ctx.rank} of {self.ctx.world_size} needs a stage with embedding="
                             f"{self.ctx.is_first} and output head={self.ctx.is_last}, got embedding={has_embed} "
                             f"and output head={has_head}")

    def make_cache(self, rows: int, max_seq_len: int, spare_slots: int = 0) -> RollingCache:
        """Cache rows for this stage's layers only."""
        return RollingCache(self.model.args, rows=rows, dtype=self.dtype, device=self.device,
                            max_seq_len=max_seq_len, layers=[int(i) for i in self.model.layers],
                            spare_slots=spare_slots)

    # -- one step ----------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, plan: BatchPlan, cache: RollingCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run this stage over the step's micro-batches; the last rank returns the logits, the others None."""
        ctx = self.ctx
        dim = self.model.args.dim
        self._wait_sends()
        groups = split_groups(plan.lengths, self.micro_batches, self.min_group_tokens)
        offsets = [0]
        for n in plan.lengths:
            offsets.append(offsets[-1] + n)
        rows = plan.rows or []
        plans = [plan] if len(groups) == 1 else [
            self.model.plan(plan.lengths[a:b], starts=plan.starts[a:b], rows=rows[a:b], cache=cache,
                            decode=None if plan.decode is None else max(0, min(plan.decode, b) - a))
            for a, b in groups]
        # Post every receive at once: group m can arrive while group m-1 is still being computed.
        recvs = []
        if not ctx.is_first:
            with peer_errors(ctx, "receiving activations"):
                for m, (a, b) in enumerate(groups):
                    buf = torch.empty(offsets[b] - offsets[a], dim, dtype=self.dtype, device=self.device)
                    recvs.append((dist.irecv(buf, src=ctx.prev, tag=m), buf))
        wanted = None if logits_at is None else logits_at.tolist()
        outs = []
        for m, ((a, b), sub) in enumerate(zip(groups, plans, strict=True)):
            t0, t1 = offsets[a], offsets[b]
            if ctx.is_first:
                x = tokens[t0:t1]
            else:
                work, x = recvs[m]
                with peer_errors(ctx, "receiving activations"):
                    if work is not None:
                        work.wait()
            at = None
            if ctx.is_last and wanted is not None:
                at = torch.tensor([i - t0 for i in wanted if t0 <= i < t1], dtype=torch.long, device=self.device)
            y = self.model(x, sub, cache, logits_at=at)
            if ctx.is_last:
                outs.append(y)
            else:
                with peer_errors(ctx, "sending activations"):
                    self._inflight.append((dist.isend(y.contiguous(), dst=ctx.next, tag=m), y))
        if not ctx.is_last:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _wait_sends(self) -> None:
        with peer_errors(self.ctx, "sending activations"):
            for work, _ in self._inflight:
                if work is not None:
                    work.wait()
        self._inflight.clear()

    def share(self, values: Sequence[float]) -> list[float]:
        """Rank 0's ``values`` on every rank: for what each rank measures itself but all must decide alike (the
        step times speculative decoding chooses its drafts by)."""
        shared = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        with peer_errors(self.ctx, "sharing the step times"):
            dist.broadcast(shared, src=0)
        return shared.tolist()

    def sample(self, logits: torch.Tensor | None, rows: Sequence[RowSampling]) -> list[Sampled]:
        """The last rank samples (``sampling.sample``) and broadcasts what every row gained in one message; every
        rank returns the same results."""
        ctx = self.ctx
        size = packed_size(rows, self.model.args.vocab_size)
        if ctx.is_last:
            assert logits is not None
            packed = pack(sample(logits, rows), rows, self.model.args.vocab_size).to(self.device)
        else:
            packed = torch.empty(size, dtype=torch.float64, device=self.device)
        self._wait_sends()
        with peer_errors(ctx, "receiving the sampled tokens"):
            dist.broadcast(packed, src=ctx.last)
        # Stop checks need the ids on the host: one read per step, as in LocalExecutor.sample.
        return unpack(packed.tolist(), rows, self.model.args.vocab_size)


# What a step's sampling gives every row, as one float64 vector (float64 holds every token id and every fp32
# log-probability exactly). Per row, sized by what every rank knows from the rows alone (P = its positions,
# k = its top alternatives):
#     [ n kept | P token ids | P log-probabilities | P * k top ids | P * k top log-probabilities ]
# of which the first n of each part are meaningful.

def _top_k(row: RowSampling, vocab_size: int) -> int:
    return min(row.params.logprobs, vocab_size)


def packed_size(rows: Sequence[RowSampling], vocab_size: int) -> int:
    """Length of the vector ``pack`` fills for these rows.

    >>> from sirocco.generate.sampling import SamplingParams
    >>> packed_size([RowSampling(SamplingParams()), RowSampling(SamplingParams(logprobs=2), draft=[5, 6])], 100)
    22
    """
    return sum(1 + 2 * r.positions + 2 * r.positions * _top_k(r, vocab_size) for r in rows)


def pack(results: Sequence[Sampled], rows: Sequence[RowSampling], vocab_size: int) -> torch.Tensor:
    """The results of ``sample`` for ``rows`` as the vector described above."""
    values: list[float] = []
    for res, r in zip(results, rows, strict=True):
        n, p, k = len(res.tokens), r.positions, _top_k(r, vocab_size)
        pad = [0.0] * (p - n)
        values += [n, *res.tokens, *pad, *res.logprobs, *pad]
        if k:
            top = res.top or []
            values += [float(t) for pairs in top for t, _ in pairs] + [0.0] * (p - n) * k
            values += [lp for pairs in top for _, lp in pairs] + [0.0] * (p - n) * k
    return torch.tensor(values, dtype=torch.float64)


def unpack(values: list[float], rows: Sequence[RowSampling], vocab_size: int) -> list[Sampled]:
    """``pack``'s inverse."""
    out: list[Sampled] = []
    at = 0
    for r in rows:
        p, k = r.positions, _top_k(r, vocab_size)
        n = int(values[at])
        tokens = [int(t) for t in values[at + 1:at + 1 + n]]
        logprobs = values[at + 1 + p:at + 1 + p + n]
        at += 1 + 2 * p
        top = None
        if k:
            ids, lps = values[at:at + n * k], values[at + p * k:at + p * k + n * k]
            top = [[(int(ids[j * k + i]), lps[j * k + i]) for i in range(k)] for j in range(n)]
            at += 2 * p * k
        out.append(Sampled(tokens, logprobs, top))
    return out
