"""The generation engine: many prompts at once, packed without padding, over one rolling cache.

The data path of one step::

    running sequences --(starts, lengths, rows)--> BatchPlan --> executor: model(tokens, plan, cache) --> logits
        --> executor.sample (sampling.py: each row's processor, generator, draft) --> tokens, logprobs, top-k
        --> stop checks --> events

The engine runs forever and takes requests at any time: ``add_request`` queues a prompt, ``step`` runs one
model step and returns its events, ``abort`` stops a request (its row is free at once). ``generate`` and
``stream`` are loops over the same calls for a fixed list of prompts.

It is split at the step boundary: the scheduler (scheduler.py) decides what a step runs (admission into free
rows, first come first served; the step's token budget; finishing, aborts, row compaction); the executor it is
handed (executor.py) runs the model call and the sampling, in this process or over pipeline stages
(distributed/executor.py); the engine turns sampled tokens into events and stop decisions.

Steps (``mixed=True``, the default): every decoding sequence brings its last token and sequences with prompt
left bring chunks (at most ``chunk_size`` each, ``max_batch_tokens`` in all, decode tokens first), so a long
prompt no longer stalls everyone's decode for its whole pre-fill. A step whose sequences all bring one token
runs the plan's decode path, over the cache rows in place. With ``mixed=False``: pre-fill steps while any
prompt is not cached, then decode steps. Running sequences keep rows 0..B-1 (a freed row takes the last one)
so the decode step reads the cache rows as a view, never as a gather.

Prefix reuse (``prefix_cache_bytes``, prefix.py): when a prompt's last chunk has been pre-filled, its row's keys and
values go to the store (at the start of the next step, so that the copy does not delay the first token; before
the row is freed if it finishes or is aborted first). A request admitted later whose prompt starts with a stored
one gets them copied into its row and starts with ``cached = m``, so only the rest is pre-filled
(``Completion.cached_tokens``). Where a window has overwritten what it would need, it is pre-filled cold.

Speculative decoding (``speculation=Speculation(...)``, speculation.py): a decoding sequence may bring tokens
proposed by a drafter after its last one; the step verifies them (the sampler keeps the agreeing ones and one
token of the target's own) and the sequence's cached count rolls back past the rejected ones. Greedy output is
the same, bit for bit, as without it.

Threads: single-threaded by design. One thread (a server's engine thread) makes every call; nothing here
locks. Pipeline ranks: every rank must make the same calls in the same order (the scheduling is a pure
function of them), request ids included.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union

import torch

from .. import backends
from ..errors import SiroccoError
from ..model import Transformer
from ..plan import BatchPlan
from .drafters import Draft
from .executor import Executor, LocalExecutor
from .prefix import PrefixStore
from .sampling import LogitsProcessor, RowSampling, Sampled, SamplingParams, make_generator
from .scheduler import Scheduler, Step
from .speculation import (
    ROW_EXACT_TOKENS,
    RowSpeculation,
    Speculation,
    Speculator,
    leading_decode,
    make_drafter,
    measure_steps,
    step_runner,
)
from .text import TextTracker

log = logging.getLogger(__name__)


class StepObserver(Protocol):
    """What the engine tells a recorder (``viz.Trace``) after each step; the MoE layers call ``on_router``."""

    def on_step(self, phase: str, plan: BatchPlan, cache_positions: dict[int, int], tokens: torch.Tensor,
                seqs: list[int], prefill: str) -> None: ...

    def on_row_move(self, src: int, dst: int) -> None: ...

    def on_row_restore(self, row: int, cached: int, sizes: dict[Optional[int], int]) -> None: ...

    def on_router(self, layer: int, chosen: torch.Tensor, weights: torch.Tensor) -> None: ...


@dataclass
class RowStep:
    """One step as one observed request saw it (``add_request(..., observer=...)``): where its tokens sit in the
    step's packing, what its row holds after it, its MoE routing, and the step's time and make-up.

    ``plan`` is the whole step's plan, shared and read only; the request is its sequence ``index`` (its queries
    are ``plan.lengths[index]`` tokens from ``plan.starts[index]``, its cache row ``row``). ``routing`` holds, per
    MoE layer, the rows of ``chosen`` (n, k) and ``weights`` (n, k) that are this request's n tokens. For a
    request in a step of 3 sequences of lengths [1, 5, 1] at index 1: its queries are packed tokens 1..5, its
    routing rows 1..5 of each layer's (7, k) choices. With speculation, a decoding request's tokens are its last
    token and the draft the step verified, and ``cached`` counts what its row keeps after the rejected drafts
    are rolled back. A request that continued from the prefix store starts at ``start = m``: its first step
    carries the m prompt tokens its row was given before it (``restored``, positions 0..m-1).
    """

    plan: BatchPlan
    index: int
    row: int
    start: int
    tokens: list[int]
    cached: int                                  # tokens its row holds after the step
    routing: dict[int, tuple[torch.Tensor, torch.Tensor]]
    kind: str                                    # the step's phase: "prefill", "decode" or "mixed"
    prefill: str                                 # the pre-fill attention path ("per_sequence" or "dense")
    seconds: float                               # the step's model call and sampling
    rows: int                                    # sequences in the step
    prefill_tokens: int                          # over the whole step
    decode_tokens: int
    restored: Sequence[int] = ()                 # the request's first step only: its prompt's restored tokens
    drafted: int = 0                             # draft tokens it verified (speculation); it kept cached - start - 1


class RowObserver(Protocol):
    """Told of every step that runs one request's row, and of nothing else (see ``RowStep``). Called on the
    engine's thread right after the step: keep it short, hand the work on."""

    def on_row_step(self, step: RowStep) -> None: ...

Prompt = Union[str, Sequence[int]]


class PromptTooLong(SiroccoError):
    pass


def fit_cache_len(model_max: int, prompt_lengths: Sequence[int], max_tokens: int) -> int:
    """Positions to size the cache for: the longest prompt plus its generation, at most the model's context
    (the cache of a layer without a window holds every position: 32k positions x rows would be GBs).

    >>> fit_cache_len(32768, [5, 12], 100), fit_cache_len(64, [60], 100)
    (112, 64)
    """
    return min(model_max, max(prompt_lengths) + max_tokens)


@dataclass
class Completion:
    """The result for one prompt. ``tokens`` and ``logprobs`` align; ``text`` stops before a stop string."""

    index: int
    prompt: Optional[str]
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None   # "stop" (EOS, a stop string, a complete grammar), "length" or "abort"
    request_id: str = ""
    # per token, its most likely alternatives [(id, logprob), ...], where SamplingParams.logprobs asked for them
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # draft tokens verified for this sequence and those accepted, where the engine speculates (else None)
    proposed_tokens: Optional[int] = None
    accepted_tokens: Optional[int] = None
    cached_tokens: int = 0                # prompt tokens restored from the prefix store instead of pre-filled

    def to_json(self) -> dict:
        out: dict[str, Any] = {"index": self.index, "prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
               "tokens": self.tokens, "text": self.text, "logprobs": self.logprobs,
               "finish_reason": self.finish_reason}
        if self.top_logprobs:
            out["top_logprobs"] = [[[t, lp] for t, lp in alternatives] for alternatives in self.top_logprobs]
        if self.proposed_tokens is not None:
            out["proposed_tokens"] = self.proposed_tokens
            out["accepted_tokens"] = self.accepted_tokens
        return out


@dataclass
class Event:
    """One streamed piece: a new token of sequence ``index`` and the text it completes (may be empty while a
    multi-byte character or a possible stop string is pending). ``completion`` is set on the last event."""

    index: int
    token: Optional[int]
    logprob: Optional[float]
    text: str
    completion: Optional[Completion] = None
    request_id: str = ""
    top: Optional[list[tuple[int, float]]] = None     # the token's alternatives, where the params asked for them


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0                  # tokens generated by sequences past their prompt (drafts kept included)
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cached_tokens: int = 0                  # prompt tokens restored from the prefix store (not in prefill_tokens)
    proposed_tokens: int = 0                # draft tokens verified
    accepted_tokens: int = 0                # ... and accepted
    draft_steps: int = 0                    # steps that verified drafts

    @property
    def seconds(self) -> float:
        """Time in model steps, pre-fill and decode."""
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens(self) -> int:
        """Tokens through the model, pre-fill and decode."""
        return self.prefill_tokens + self.decode_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class _Waiting:
    """A validated request in the queue."""

    out: Completion
    params: SamplingParams
    observer: Optional[RowObserver] = None


@dataclass(eq=False)
class _Running:
    """A sequence in flight. ``row`` is its cache row; ``cached`` how many of its tokens the cache holds;
    ``order`` its place in admission order."""

    out: Completion
    params: SamplingParams
    row: int
    generator: Optional[torch.Generator]
    text: Optional[TextTracker]
    processor: Optional[LogitsProcessor] = None
    order: int = 0
    cached: int = 0
    spec: Optional[RowSpeculation] = None      # its drafting state, where the engine speculates
    observer: Optional[RowObserver] = None

    @property
    def request_id(self) -> str:
        return self.out.request_id

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the cache (0 once decoding, when the cache also holds generated ones)."""
        return max(0, len(self.out.prompt_tokens) - self.cached)


class Engine:
    """Generates for any number of prompts with one model and one cache allocated up front.

    The engine runs the model as it is handed: what computes it (the backend) and the pre-fill attention path are
    the conversion pass's (``backends.attach``, which ``pretrained.load`` runs), never changed here.

    Args:
        model: the Transformer (any dtype/device; the cache follows it), prepared by ``backends.attach``.
        tokenizer: needed for text prompts, text output and stop strings; token-id prompts work without.
        max_rows: most sequences generated at once (rows of the cache).
        chunk_size: most tokens of one prompt per pre-fill step (default: the model's smallest window, or 4096).
        max_seq_len: longest prompt + generation (sizes the cache of layers without a window; default the
            model's max_seq_len). Positions past it are refused with the limit in the message.
        max_batch_tokens: most tokens in one step, over all sequences (default 4 * chunk_size); decode tokens
            count 1 each and are never left out.
        executor: runs each step's model call and sampling (default: ``LocalExecutor(model)``, this process).
        trace: a ``StepObserver`` (``viz.Trace``) that records every step's plan, cache writes and MoE routing
            (for ``sirocco viz``); None records nothing and costs nothing.
        mixed: put pre-fill chunks and decode tokens in the same step (default); False: pre-fill steps until
            every running prompt is cached, then decode steps.
        prefix_cache_bytes: keep the pre-filled state of prompts in a store of this many bytes (``prefix.py``), so
            a prompt that starts with a stored one is pre-filled only from where they differ; 0 (the default):
            no store.
        speculation: speculative decoding (``Speculation``: the drafter, the most draft tokens per step); None:
            none. It needs the model on the cpu backend (its row-exact kernels; a model on the torch backend is
            refused); over pipeline ranks, prompt lookup only. At start-up it measures the model's step time at 1
            to 8 tokens (every rank alike, the first rank's times kept), unless the ``Speculation`` gives the
            curve. A draft model is run as it was prepared.

    >>> engine = Engine(model, tokenizer, max_rows=8)                      # doctest: +SKIP
    >>> [c.text for c in engine.generate(["Hello", "The window"], SamplingParams(max_tokens=16))]  # doctest: +SKIP
    """

    def __init__(self, model: Transformer, tokenizer=None, max_rows: int = 8, chunk_size: Optional[int] = None,
                 max_seq_len: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 executor: Optional[Executor] = None, trace: Optional[StepObserver] = None, mixed: bool = True,
                 speculation: Optional[Speculation] = None, prefix_cache_bytes: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.args = model.args
        self.max_rows = max_rows
        windows = [w for w in self.args.windows() if w is not None]
        self.chunk_size = int(chunk_size or (min(windows) if windows else 4096))
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        self.max_seq_len = min(max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        self.max_batch_tokens = int(max_batch_tokens or 4 * self.chunk_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.executor: Executor = executor if executor is not None else LocalExecutor(model)
        if speculation is not None and not callable(getattr(self.executor, "share", None)):
            raise SiroccoError("speculative decoding needs an executor that can share the step times its "
                               "processes measure (Executor.share)")
        spare = speculation.draft_tokens if speculation is not None else 0
        self.cache = (self.executor.make_cache(max_rows, self.max_seq_len, spare_slots=spare) if spare
                      else self.executor.make_cache(max_rows, self.max_seq_len))
        log.info("cache: %d rows x %s slots, %.1f MiB (%s)", max_rows,
                 sorted({self.cache.size_for(w) for w in self.args.windows()}, key=int),
                 self.cache.nbytes() / 2**20, self.dtype)
        self.prefix: Optional[PrefixStore] = None
        if prefix_cache_bytes > 0:
            self.prefix = PrefixStore(self.cache, self.args.n_kv_heads, self.args.head_dim, prefix_cache_bytes)
        self.backend = backends.backend_of(model)          # what the conversion pass put the model on
        self.attention = backends.prefill_of(model)
        self.speculator = self._speculator(speculation) if speculation is not None else None
        self.trace = trace
        model.observe_routing(None if trace is None else trace.on_router)
        self.stats = Stats()
        self.mixed = mixed
        self.scheduler: Scheduler[_Waiting, _Running] = Scheduler(
            max_rows, self.chunk_size, self.max_batch_tokens, mixed, start=self._start, move_row=self._move_row,
            request_id=lambda w: w.out.request_id)
        self._unfinished: set[str] = set()       # ids waiting or running
        self._aborted: list[Event] = []          # final events of aborted requests, for the next step()
        # Sequences whose prompt's last chunk ran in the last step, to store at the start of the next one (so that
        # the copy does not delay their first token) or before their rows are freed.
        self._to_save: list[_Running] = []
        self._next_index = 0                     # Completion.index of the next add_request
        self._id_counter = 0
        self._observed: set[str] = set()         # ids of unfinished requests with a RowObserver

    # -- public API ----------------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None, observer: Optional[RowObserver] = None) -> str:
        """Queue a prompt (first come, first served) and return its id; it runs from the next ``step()`` that
        has a free row. Validates at once: an invalid prompt raises (``PromptTooLong``, ``SiroccoError``) and
        queues nothing; an id that is already waiting or running raises ``ValueError``. Without an id, a new
        one is made ("req-N", the same on every pipeline rank). ``observer`` is told of each step that runs
        this request (``RowObserver``); requests without one cost no observing work."""
        if request_id is not None and request_id in self._unfinished:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self._request(self._next_index, prompt, params, request_id)
        self._next_index += 1
        if observer is not None:
            req.observer = observer
            self._observed.add(req.out.request_id)
        self._queue(req)
        return req.out.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request: a waiting one leaves the queue, a running one frees its cache row at once. The next
        ``step()`` returns its final Event (``completion.finish_reason == "abort"``, no token). False if the
        id is unknown or already finished."""
        self._save_prompts(self._to_save)            # before a row is freed or moved
        waiting, seq = self.scheduler.abort(request_id)
        if waiting is not None:
            out = waiting.out
        elif seq is not None:
            out = seq.out
            self._release_draft(seq)
        else:
            return False
        out.finish_reason = "abort"
        piece = ""
        if seq is not None and seq.text is not None:
            piece = seq.text.finish()
            out.text = seq.text.text
        self._unfinished.discard(request_id)
        self._observed.discard(request_id)
        self._aborted.append(Event(out.index, None, None, piece, completion=out, request_id=request_id))
        return True

    def step(self) -> list[Event]:
        """Run one model step (admitting waiting requests into free rows first) and return its events: one per
        token sampled, in packing order, after the final events of requests aborted since the last step. With
        nothing to run, no model call: returns the pending abort events, or []."""
        events, self._aborted = self._aborted, []
        with torch.inference_mode():
            self._save_prompts(self._to_save)
            plan = self.scheduler.schedule()
            if plan is None:
                return events
            for seq, sampled in self._run(plan):
                events += self._advance(seq, sampled)
            done = [s for s in plan.seqs if s.out.finish_reason is not None]
            for s in done:
                self._unfinished.discard(s.out.request_id)
                self._observed.discard(s.out.request_id)
                self._release_draft(s)
            self._save_prompts([s for s in self._to_save if s in done])
            self.scheduler.release(done)
        return events

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running (or an abort's final event is still to be returned)."""
        return self.scheduler.has_unfinished() or bool(self._aborted)

    @property
    def num_running(self) -> int:
        """Sequences holding a cache row."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a row."""
        return len(self.scheduler.waiting)

    def generate(self, prompts: Iterable[Prompt], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 ) -> list[Completion]:
        """Run every prompt to completion; results in prompt order."""
        done: dict[int, Completion] = {}
        for event in self.stream(prompts, params):
            if event.completion is not None:
                done[event.index] = event.completion
        return [done[i] for i in sorted(done)]

    def stream(self, prompts: Iterable[Prompt], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               ) -> Iterator[Event]:
        """Yield an ``Event`` per generated token of any sequence, as soon as it is sampled. ``index`` is the
        prompt's position in ``prompts``. Needs an engine with no other requests in flight; every prompt is
        validated before any is queued; leaving the loop early aborts the prompts not yet finished."""
        prompts = list(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if self.has_unfinished():
            raise RuntimeError("stream() and generate() need an idle engine: other requests are in flight "
                               "(drive them with step(), or abort them)")
        reqs = [self._request(i, p, sp, None) for i, (p, sp) in enumerate(zip(prompts, params))]
        for req in reqs:
            self._queue(req)
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:
            if self.has_unfinished():                  # the caller stopped early: free the rows it held
                for req in reqs:
                    self.abort(req.out.request_id)
                self._aborted.clear()

    # -- steps ---------------------------------------------------------------------------------------------
    def _run(self, step: Step[_Running]) -> list[tuple[_Running, Sampled]]:
        """One model call over the step's packed sequences; samples for every sequence whose prompt is then
        all in the cache (decoding ones, and chunks that end their prompt). With speculation, decoding sequences
        may bring drafts after their last token: every position of theirs is sampled (verified), and their cached
        count then rolls back past the rejected drafts."""
        t0 = time.perf_counter()
        seqs, lengths = step.seqs, step.lengths
        sampling = [i for i, (s, n) in enumerate(zip(seqs, lengths)) if not s.prompt_left or n == s.prompt_left]
        drafts: dict[int, Draft] = {}
        decode = None
        if self.speculator is not None:
            drafts = self.speculator.drafts(seqs, lengths, self.max_seq_len, len(sampling))
            if drafts:
                # the sequences the plain step runs with the decode op keep it: a verified position gets the bits
                # of a plain decode step, and a one-token chunk those it gets there
                decode = leading_decode(lengths)
                lengths = [n + len(drafts[i].tokens) if i in drafts else n for i, n in enumerate(lengths)]
        ids: list[int] = []
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            if s.prompt_left:
                ids += s.out.prompt_tokens[s.cached:s.cached + n]
            else:
                ids += [s.out.tokens[-1]] + (drafts[i].tokens if i in drafts else [])
        prompt_tokens = sum(n for s, n in zip(seqs, lengths) if s.prompt_left)
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        starts = [s.cached for s in seqs]
        plan = self.model.plan(lengths, starts=starts, rows=[s.row for s in seqs], cache=self.cache, decode=decode)
        logits_at = None
        if len(sampling) < len(seqs) or any(n > 1 for n in lengths):
            ends = torch.tensor(lengths).cumsum(0) - 1
            at = [p for i in sampling for p in range(int(ends[i]) - (len(drafts[i].tokens) if i in drafts else 0),
                                                     int(ends[i]) + 1)]
            logits_at = torch.tensor(at, dtype=torch.long, device=self.device)
        watched = [i for i, s in enumerate(seqs) if s.observer is not None] if self._observed else []
        routing = self._observe_routing() if watched and self.args.moe is not None else None
        try:
            logits = self.executor.forward(tokens, plan, self.cache, logits_at=logits_at)
        finally:
            if routing is not None:
                self.model.observe_routing(None if self.trace is None else self.trace.on_router)
        for s, n in zip(seqs, lengths):
            if self.prefix is not None and n == s.prompt_left:       # its prompt's last chunk (never with drafts)
                self._to_save.append(s)         # its row holds exactly the pre-filled prompt until the next step
            s.cached += n
        result = self._sample([seqs[i] for i in sampling], logits, [drafts.get(i) for i in sampling])
        decoded = 0
        for i, (s, sampled) in zip(sampling, result):
            if i in drafts:
                s.cached = starts[i] + len(sampled.tokens)        # roll back past the rejected drafts
                self.stats.proposed_tokens += len(drafts[i].tokens)
                self.stats.accepted_tokens += len(sampled.tokens) - 1
            if self.speculator is not None:
                self.speculator.settle(s, drafts.get(i), sampled.tokens)
                if s.spec is not None:
                    s.out.proposed_tokens, s.out.accepted_tokens = s.spec.proposed, s.spec.accepted
            if not seqs[i].prompt_left and starts[i] >= len(s.out.prompt_tokens):
                decoded += len(sampled.tokens)
        if self.trace is not None:
            self.trace.on_step(step.phase, plan, {s.row: s.cached for s in seqs}, tokens,
                               seqs=[s.out.index for s in seqs], prefill=self.attention)
        # A mixed step's time is shared between pre-fill and decode in proportion to their tokens.
        seconds, total = time.perf_counter() - t0, sum(lengths)
        self.stats.prefill_tokens += prompt_tokens
        self.stats.prefill_seconds += seconds * prompt_tokens / total
        if decoded:
            self.stats.decode_tokens += decoded
            self.stats.decode_steps += 1
            self.stats.decode_seconds += seconds * (total - prompt_tokens) / total
        self.stats.draft_steps += bool(drafts)
        if watched:
            drafted = {i: len(d.tokens) for i, d in drafts.items()}
            self._tell_observers(step, plan, tokens, watched, routing or {}, seconds, prompt_tokens, lengths, starts,
                                 drafted)
        return result

    def _save_prompts(self, seqs: list[_Running]) -> None:
        """Store these sequences' pre-filled prompts (their rows hold nothing else yet) and forget them."""
        if not seqs:
            return
        assert self.prefix is not None
        for s in seqs:
            self.prefix.save(s.out.prompt_tokens, s.row)
        self._to_save = [s for s in self._to_save if s not in seqs]

    # -- observed requests (add_request(..., observer=)) ----------------------------------------------------------
    def _observe_routing(self) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Collect this step's MoE choices (each layer's calls in order: a pipeline stage may route in parts),
        passing them on to the engine's trace too if it has one."""
        routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        trace = self.trace

        def collect(layer: int, chosen: torch.Tensor, weights: torch.Tensor) -> None:
            routing.setdefault(layer, []).append((chosen, weights))
            if trace is not None:
                trace.on_router(layer, chosen, weights)
        self.model.observe_routing(collect)
        return routing

    def _tell_observers(self, step: Step[_Running], plan: BatchPlan, tokens: torch.Tensor, watched: list[int],
                        routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], seconds: float,
                        prompt_tokens: int, lengths: list[int], starts: list[int], drafted: dict[int, int]) -> None:
        """Give each observed sequence of the step its slice of the step (``lengths``: the tokens each brought,
        drafts included; ``starts``: its first position; ``drafted``: the draft tokens each verified)."""
        routed = {layer: parts[0] if len(parts) == 1 else (torch.cat([c for c, _ in parts]),
                                                          torch.cat([w for _, w in parts]))
                  for layer, parts in routing.items()}
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        ids = tokens.tolist()
        total = sum(lengths)
        for i in watched:
            s, a, b = step.seqs[i], offsets[i], offsets[i + 1]
            assert s.observer is not None
            m = s.out.cached_tokens                 # a row restored from the prefix store starts there, once
            s.observer.on_row_step(RowStep(
                plan=plan, index=i, row=s.row, start=starts[i], tokens=ids[a:b], cached=s.cached,
                routing={layer: (c[a:b], w[a:b]) for layer, (c, w) in routed.items() if len(c) == total},
                kind=step.phase, prefill=self.attention, seconds=seconds, rows=len(step.seqs),
                prefill_tokens=prompt_tokens, decode_tokens=total - prompt_tokens,
                restored=s.out.prompt_tokens[:m] if m and starts[i] == m else (), drafted=drafted.get(i, 0)))

    def _sample(self, seqs: list[_Running], logits: Optional[torch.Tensor],
                drafts: Optional[list[Optional[Draft]]] = None) -> list[tuple[_Running, Sampled]]:
        if not seqs:
            return []
        rows = [RowSampling(s.params, s.generator, s.processor) if d is None else
                RowSampling(s.params, s.generator, s.processor, draft=d.tokens, draft_probs=d.probs)
                for s, d in zip(seqs, drafts or [None] * len(seqs))]
        return list(zip(seqs, self.executor.sample(logits, rows)))

    # -- speculation ---------------------------------------------------------------------------------------
    def _speculator(self, config: Speculation) -> Speculator:
        from ..backends.cpu import row_exact_reason

        reason = row_exact_reason(self.model)
        if reason is not None:
            raise SiroccoError(f"speculative decoding needs the model on the cpu backend's row-exact kernels (a "
                               f"token gets the same bits whatever the tokens beside it, so verified drafts keep plain "
                               f"decoding's output; backends.attach(model, 'cpu') prepares it), and here {reason}")
        drafter = make_drafter(config, self.model, self.max_rows, self.max_seq_len, self.chunk_size)
        if drafter.costly and not isinstance(self.executor, LocalExecutor):
            raise SiroccoError("a draft model runs in one process: over pipeline ranks, speculate with prompt lookup")
        cost = config.cost_curve
        if cost is None:       # every process of a pipeline runs the same steps, then takes the first one's times
            cost = self.executor.share(measure_steps(step_runner(self.model, self.cache, self.executor.forward)))
        draft_cost = config.draft_cost_curve
        if draft_cost is None and drafter.costly and hasattr(drafter, "decode_step"):
            draft_cost = measure_steps(drafter.decode_step, counts=min(ROW_EXACT_TOKENS, self.max_rows))
        log.info("speculation: %s drafter, up to %d draft tokens per row; a step of 1..%d tokens costs %s x one",
                 type(drafter).__name__, config.draft_tokens, len(cost),
                 " ".join(f"{t / cost[0]:.2f}" for t in cost))
        return Speculator(config, drafter, cost, draft_cost,
                          max_step_tokens=min(ROW_EXACT_TOKENS, self.max_batch_tokens))

    def _release_draft(self, seq: _Running) -> None:
        if self.speculator is not None:
            self.speculator.drafter.release(seq.request_id)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _request(self, index: int, prompt: Prompt, params: SamplingParams,
                 request_id: Optional[str]) -> _Waiting:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SiroccoError("text prompts need a tokenizer; pass token ids or a tokenizer")
            ids, text = self.tokenizer.encode(prompt, bos=True, eos=False), prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise SiroccoError(f"prompt {index} is empty")
        if len(ids) >= self.max_seq_len:
            raise PromptTooLong(f"prompt {index} has {len(ids)} tokens; the limit is {self.max_seq_len - 1} "
                                f"(max_seq_len {self.max_seq_len} leaves room for one generated token)")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise SiroccoError(f"prompt {index} has token ids outside the vocabulary of {self.args.vocab_size}: "
                               f"{bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise SiroccoError("stop strings need a tokenizer")
        wrong = [t for t in params.logit_bias or () if not 0 <= int(t) < self.args.vocab_size]
        if wrong:
            raise SiroccoError(f"logit_bias names token ids outside the vocabulary of {self.args.vocab_size}: "
                               f"{wrong[:5]}")
        if request_id is None:
            request_id = self._new_id()
        return _Waiting(Completion(index=index, prompt=text, prompt_tokens=ids, request_id=request_id), params)

    def _new_id(self) -> str:
        while True:
            rid = f"req-{self._id_counter}"
            self._id_counter += 1
            if rid not in self._unfinished:
                return rid

    def _queue(self, req: _Waiting) -> None:
        self._unfinished.add(req.out.request_id)
        self.scheduler.add(req)

    def _start(self, req: _Waiting, row: int, order: int) -> _Running:
        out, params = req.out, req.params
        gen = make_generator(params.seed, self.device) if params.temperature > 0 else None
        text = TextTracker(self.tokenizer, out.prompt_tokens, params.stop) if self.tokenizer is not None else None
        cached = 0
        if self.prefix is not None:
            hit = self.prefix.lookup(out.prompt_tokens)
            if hit is not None:
                cached = out.cached_tokens = self.prefix.restore(hit, row)
                self.stats.cached_tokens += cached
                if self.trace is not None:
                    self.trace.on_row_restore(row, cached, self.cache.cache_lens())
        return _Running(out=out, params=params, row=row, generator=gen, text=text,
                        processor=params.processor(self.tokenizer, self.args.vocab_size), order=order, cached=cached,
                        observer=req.observer,
                        spec=None if self.speculator is None else self.speculator.start(params))

    def _move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
        if self.speculator is not None:
            self.speculator.drafter.move_row(src, dst)
        if self.trace is not None:
            self.trace.on_row_move(src, dst)

    def _advance(self, seq: _Running, sampled: Sampled) -> list[Event]:
        """Append what the row gained this step, token by token until the sequence is done; one event each."""
        events = []
        for j, (token, logprob) in enumerate(zip(sampled.tokens, sampled.logprobs)):
            top = sampled.top[j] if sampled.top is not None else None
            events.append(self._advance_one(seq, token, logprob, top))
            if seq.out.finish_reason is not None:
                break
        return events

    def _advance_one(self, seq: _Running, token: int, logprob: float,
                     top: Optional[list[tuple[int, float]]]) -> Event:
        """Append a sampled token, decide whether the sequence is done, and say what text it adds."""
        out, p = seq.out, seq.params
        out.tokens.append(token)
        out.logprobs.append(logprob)
        if top is not None:
            out.top_logprobs.append(top)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        if seq.processor is not None:
            seq.processor.accept([token])
        piece = ""
        if p.stop_on_eos and eos is not None and token == eos:
            out.finish_reason = "stop"
        elif seq.text is not None:
            piece, hit = seq.text.push(token)
            if hit:
                out.finish_reason = "stop"
        if out.finish_reason is None and seq.processor is not None and seq.processor.finished():
            out.finish_reason = "stop"            # a complete grammar: only EOS could follow
        if out.finish_reason is None and (len(out.tokens) >= p.max_tokens
                                          or len(out.prompt_tokens) + len(out.tokens) >= self.max_seq_len):
            out.finish_reason = "length"
        if out.finish_reason is not None:
            if seq.text is not None:
                piece += seq.text.finish()
                out.text = seq.text.text
            return Event(out.index, token, logprob, piece, completion=out, request_id=out.request_id, top=top)
        return Event(out.index, token, logprob, piece, request_id=out.request_id, top=top)
