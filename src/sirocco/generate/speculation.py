"""Speculative decoding in the engine: which rows draft how many tokens in a step, and what their acceptance says.

A decoding row that drafts d tokens brings ``[its last token, d1 .. dd]`` to the step as one decode sequence of
d + 1 tokens (plan.py: each token attends like a decode token at its own position, after all of them are
written to its cache row, which has room for them beside the window: cache.py); the step computes the logits of
all d + 1 positions and the sampler keeps m of them (sampling.py): the accepted drafts and one token of the
target's own. The row's cached count then goes back to its last token's position + m: the keys of the rejected
drafts are forgotten, and overwritten when the row gets there again.

**The same output.** A verified position gets the bits of a plain decode step at that position: the linear
layers, norms, rotations and MoE kernels of the CPU backend (and the quantized kernels) compute each row of 1 to
``ROW_EXACT_TOKENS`` rows with bits that do not depend on the rows beside it; the decode attention of each query
reads its window in the order of a ring of exactly the window, with the softmax of a query alone
(backends/cpu/modules.py). So a step with drafts carries at most ``ROW_EXACT_TOKENS`` tokens, and the plain
PyTorch backend (whose products round differently for different row counts) cannot speculate: the engine takes
the CPU backend for it. Greedy rows then keep exactly the tokens and log-probabilities of plain decoding;
sampled rows with a drafter that proposes tokens without a distribution (prompt lookup) draw their tokens with
the random numbers of plain decoding, so a seeded row keeps its tokens too; sampled rows with a draft model's
distributions keep the target's distribution (the rejection rule), not its draws.

**How many drafts: the rule.** At start-up the engine measures ``c(T)``, the seconds of a step of T = 1 ..
``ROW_EXACT_TOKENS`` tokens on the real model (``measure_steps``: the best of a few readings of each count). Each
row keeps an estimate ``a`` of the chance that its next draft token is accepted, from its recent drafts (counts
decayed by ``DECAY`` per observation; before any, a prior: one accept in two trials for a costly drafter, whose rows
learn only by drafting, none in one for a free drafter, whose rows learn from the proposals they do not draft); its
j-th draft token is then expected to add ``a ** j`` tokens. A step of T0 tokens in which R rows sample is given the
drafts that maximise the step's expected tokens per second, ``(R + sum of the a ** j taken) / (c(T0 + drafts) + the
drafter's own time)``, against ``R / c(T0)`` without: the extra rows must cost less than they are expected to save.
Drafts are taken in order of their expected gain, so a row of higher acceptance drafts more; a step that is
compute-bound (many rows, or pre-fill in it, where c rises steeply) or already at ``ROW_EXACT_TOKENS`` tokens gets
none. Each row also caps its drafts at ``k``, which grows by one after a draft accepted whole and falls to one more
than the accepted count after a rejection, within [1, draft_tokens]. A free drafter (prompt lookup) is asked first
and its proposal bounds the row's drafts; where a row does not draft, the first token it proposed is compared with
the token the row gets, which keeps the estimate current at no cost. A costly drafter (a draft model) is asked only
for the drafts chosen, its time (measured the same way) counted in the step's.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .drafters import Draft, Drafter, DraftRequest, ModelDrafter, NgramDrafter
from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..cache import RollingCache
    from ..model import Transformer

log = logging.getLogger(__name__)

ROW_EXACT_TOKENS = 8        # the CPU and quantized kernels' largest row count with row-independent bits
DECAY = 0.8                 # weight of an acceptance observation after each newer one
# The prior acceptance of a new row: a costly drafter's rows learn only by drafting, so they start at one accept in
# two trials (they try); a free drafter's rows learn from the proposals they did not draft, so they start at none
# in one and draft once their proposals have been seen right.
PRIOR_COSTLY, PRIOR_FREE = (1.0, 2.0), (0.0, 1.0)


@dataclass
class Speculation:
    """How an engine speculates (``Engine(..., speculation=Speculation(...))``).

    Attributes:
        drafter: "ngram" (prompt lookup), a draft ``Transformer`` with the target's vocabulary, or any ``Drafter``.
        draft_tokens: the most tokens a row drafts in one step (k), 1 to ``ROW_EXACT_TOKENS - 1``.
        ngram: the longest n-gram prompt lookup matches (it tries n, n - 1, ... down to ``min_ngram``).
        min_ngram: the shortest.
        cost_curve: seconds of a step of 1, 2, ... ``ROW_EXACT_TOKENS`` tokens, to use instead of measuring them at
            start-up (tests; a curve from an earlier run). Only its ratios matter.
        draft_cost_curve: the same for one decode step of a draft model over 1, 2, ... rows.
    """

    drafter: str | Transformer | Drafter = "ngram"
    draft_tokens: int = 4
    ngram: int = 3
    min_ngram: int = 1
    cost_curve: Sequence[float] | None = None
    draft_cost_curve: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.draft_tokens < ROW_EXACT_TOKENS:
            raise ValueError(f"draft_tokens must be in [1, {ROW_EXACT_TOKENS - 1}] (a step with drafts carries at most "
                             f"{ROW_EXACT_TOKENS} tokens), got {self.draft_tokens}")
        if not 1 <= self.min_ngram <= self.ngram:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min_ngram <= ngram, got ngram={self.ngram}, "
                             f"min_ngram={self.min_ngram}")
        for name in ("cost_curve", "draft_cost_curve"):
            curve = getattr(self, name)
            if curve is not None and (len(curve) != ROW_EXACT_TOKENS or min(curve) <= 0):
                raise ValueError(f"{name} must give {ROW_EXACT_TOKENS} positive step times (1 to "
                                 f"{ROW_EXACT_TOKENS} tokens), got {list(curve)}")


@dataclass
class RowSpeculation:
    """One sequence's drafting state: its cap ``k``, its decayed acceptance counts, its totals."""

    k: int
    limit: int                                   # its own most drafts (the request's, or the engine's)
    hits: float = 0.0
    trials: float = 0.0
    proposed: int = 0
    accepted: int = 0
    shadow: int | None = None                 # a free drafter's first token, where the row did not draft
    prior: tuple[float, float] = PRIOR_COSTLY    # (hits, trials) before any observation

    @property
    def acceptance(self) -> float:
        """The estimated chance that the row's next draft token is accepted."""
        return (self.hits + self.prior[0]) / (self.trials + self.prior[1])

    def observe(self, hits: int, trials: int) -> None:
        self.hits = DECAY ** trials * self.hits + hits
        self.trials = DECAY ** trials * self.trials + trials


def leading_decode(lengths: Sequence[int]) -> int:
    """How many leading sequences of a step the plan runs with the decode op (``BatchPlan.build``'s default):
    all when every one brings one token, else the leading one-token ones.

    >>> leading_decode([1, 1, 1]), leading_decode([1, 1, 5, 1]), leading_decode([4, 1])
    (3, 2, 0)
    """
    return next((i for i, n in enumerate(lengths) if n != 1), len(lengths))


def measure_steps(run: Callable[[int], None], counts: int = ROW_EXACT_TOKENS, repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of ``run(n)`` for n = 1 .. counts: rounds over every count in turn (one untimed, then ``repeats``),
    so that a busy moment of a shared host falls on one reading of each count rather than on all readings of one,
    the best reading of each count kept; then each count no dearer than any larger one (a step never gets cheaper
    with more rows, and noise only ever adds time, so the lower envelope is the better estimate).
    """
    best = [float("inf")] * counts
    for round_ in range(repeats + 1):
        for n in range(1, counts + 1):
            t0 = clock()
            run(n)
            seconds = clock() - t0
            if round_:
                best[n - 1] = min(best[n - 1], seconds)
    for i in range(counts - 2, -1, -1):
        best[i] = min(best[i], best[i + 1])
    return best


class Speculator:
    """The engine's speculation: its drafter, the cost curves, each row's state, the choice of drafts.

    Args:
        config: the ``Speculation``.
        drafter: the drafter (built by the engine from ``config.drafter``).
        cost: seconds of a step of 1 .. ``ROW_EXACT_TOKENS`` tokens.
        draft_cost: seconds of one step of the drafter over 1 .. ``ROW_EXACT_TOKENS`` rows (costly drafters).
        max_step_tokens: the most tokens of a step with drafts (``ROW_EXACT_TOKENS``, or less where the engine's
            budget is smaller).
    """

    def __init__(self, config: Speculation, drafter: Drafter, cost: Sequence[float],
                 draft_cost: Sequence[float] | None = None, max_step_tokens: int = ROW_EXACT_TOKENS):
        self.config = config
        self.drafter = drafter
        self.cost = list(cost)
        self.draft_cost = list(draft_cost) if draft_cost is not None else None
        self.max_step_tokens = min(max_step_tokens, ROW_EXACT_TOKENS)

    def start(self, params: SamplingParams) -> RowSpeculation | None:
        """A new sequence's state, or None where its params turn drafting off."""
        limit = self.config.draft_tokens if params.draft_tokens is None else min(params.draft_tokens,
                                                                                 self.config.draft_tokens)
        prior = PRIOR_COSTLY if self.drafter.costly else PRIOR_FREE
        return RowSpeculation(k=limit, limit=limit, prior=prior) if limit > 0 else None

    # -- one step ------------------------------------------------------------------------------------------
    def drafts(self, seqs: Sequence[Any], lengths: Sequence[int], max_seq_len: int,
               sampling_rows: int) -> dict[int, Draft]:
        """The drafts of a step (index into ``seqs`` -> its draft) of sequences ``seqs`` (the engine's running
        sequences: ``spec``, ``params``, ``out``, ``cached``, ``row``, ``prompt_left``, ``request_id``) bringing
        ``lengths`` tokens each, ``sampling_rows`` of which sample a token; {} for a step without drafts."""
        base = sum(lengths)
        room = self.max_step_tokens - base
        caps: dict[int, int] = {}
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            st = s.spec
            if st is None or s.prompt_left or n != 1:
                continue
            st.shadow = None
            # drafts past the request's last token or the cache's last position would be verified for nothing
            cap = min(st.k, s.params.max_tokens - len(s.out.tokens) - 1, max_seq_len - 1 - s.cached)
            if cap > 0:
                caps[i] = cap
        if not caps or room <= 0:
            return {}
        proposals: dict[int, Draft] = {}
        if not self.drafter.costly:
            proposals = self._propose(seqs, caps)
            for i, d in proposals.items():
                seqs[i].spec.shadow = d.tokens[0] if d.tokens else None
            caps = {i: len(d.tokens) for i, d in proposals.items() if d.tokens}
        chosen = self._choose(seqs, caps, base, room, sampling_rows)
        if not chosen:
            return {}
        if self.drafter.costly:
            proposals = self._propose(seqs, chosen)
        out = {}
        for i, n in chosen.items():
            d = proposals[i]
            if d.tokens:
                out[i] = Draft(d.tokens[:n], None if d.probs is None else d.probs[:n])
                seqs[i].spec.shadow = None
        return out

    def settle(self, seq: Any, draft: Draft | None, kept: Sequence[int]) -> None:
        """After the step: learn from what the row kept (``kept``: the sampler's tokens for it) and count it."""
        st = seq.spec
        if st is None:
            return
        if draft is None or not draft.tokens:
            if st.shadow is not None and kept:
                st.observe(int(kept[0] == st.shadow), 1)
            elif self.drafter.costly:                    # nothing to learn from: drift back to the prior
                st.hits *= DECAY
                st.trials *= DECAY
            st.shadow = None
            return
        d, accepted = len(draft.tokens), len(kept) - 1
        st.proposed += d
        st.accepted += accepted
        st.observe(accepted, accepted + (accepted < d))
        if accepted == d:
            if d >= st.k:
                st.k = min(st.limit, st.k + 1)
        else:
            st.k = max(1, min(st.k - 1, accepted + 1))

    # -- internals -----------------------------------------------------------------------------------------
    def _propose(self, seqs: Sequence[Any], ks: dict[int, int]) -> dict[int, Draft]:
        order = sorted(ks)
        requests = [DraftRequest(seqs[i].request_id, seqs[i].row, seqs[i].out.prompt_tokens, seqs[i].out.tokens,
                                 ks[i], seqs[i].params) for i in order]
        return dict(zip(order, self.drafter.propose(requests), strict=True))

    def _step_cost(self, tokens: int, alloc: dict[int, int]) -> float:
        t = self.cost[tokens - 1]
        if self.draft_cost is not None and alloc:
            drafting = sum(1 for n in alloc.values() if n)
            t += max(alloc.values()) * self.draft_cost[min(drafting, len(self.draft_cost)) - 1]
        return t

    def _choose(self, seqs: Sequence[Any], caps: dict[int, int], base: int, room: int,
                sampling_rows: int) -> dict[int, int]:
        """Drafts per row that maximise the step's expected tokens per second (the module's rule)."""
        if not caps:
            return {}
        rows = max(sampling_rows, 1)
        best_rate, best = rows / self._step_cost(base, {}), {}
        alloc = {i: 0 for i in caps}
        gain = 0.0
        heap = [(-seqs[i].spec.acceptance, i) for i in caps]     # the next draft of each row: its expected gain
        heapq.heapify(heap)
        for extra in range(1, room + 1):
            if not heap:
                break
            g, i = heapq.heappop(heap)
            gain -= g
            alloc[i] += 1
            if alloc[i] < caps[i]:
                heapq.heappush(heap, (g * seqs[i].spec.acceptance, i))
            rate = (rows + gain) / self._step_cost(base + extra, alloc)
            if rate > best_rate:
                best_rate, best = rate, {j: n for j, n in alloc.items() if n}
        return best


def make_drafter(config: Speculation, model: Transformer, max_rows: int, max_seq_len: int,
                 chunk_size: int) -> Drafter:
    """The drafter ``config.drafter`` names, built for an engine of these sizes."""
    from ..model import Transformer

    d = config.drafter
    if isinstance(d, str):
        if d != "ngram":
            raise ValueError(f"unknown drafter {d!r}: 'ngram', a draft model, or a Drafter")
        return NgramDrafter(config.ngram, config.min_ngram)
    if isinstance(d, Transformer):
        if d.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {d.args.vocab_size} tokens and the target's "
                             f"{model.args.vocab_size}: a draft model needs the target's tokenizer")
        if next(d.parameters()).device != next(model.parameters()).device:
            raise ValueError("the draft model must be on the target's device")
        if d.args.max_seq_len < max_seq_len:
            raise ValueError(f"the draft model's context ({d.args.max_seq_len} positions) is shorter than the "
                             f"engine's ({max_seq_len}): give the engine a max_seq_len of at most "
                             f"{d.args.max_seq_len}")
        return ModelDrafter(d, max_rows, max_seq_len, config.draft_tokens, chunk_size=chunk_size)
    return d


def step_runner(model: Transformer, cache: RollingCache, forward: Callable[..., Any]) -> Callable[[int], None]:
    """``run(n)``: one forward of a decode sequence of n tokens at positions 0 .. n - 1 in cache row 0, as a step
    with drafts runs (the cost curve's measurement; the row is overwritten by the first sequence it serves)."""
    device = next(model.parameters()).device

    def run(n: int) -> None:
        plan = model.plan([n], starts=[0], rows=[0], cache=cache, decode=1)
        with torch.inference_mode():
            forward(torch.zeros(n, dtype=torch.long, device=device), plan, cache)
    return run
