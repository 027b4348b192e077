"""The generation engine: many prompts at once, packed without padding, over one rolling cache.

The data path of one step::

    running sequences --(starts, lengths, rows)--> BatchPlan --> executor: model(tokens, plan, cache) --> logits
        --> sample (one generator per sequence) --> tokens, logprobs --> stop checks --> events

The engine decides what a step runs; the executor it is handed (executor.py) runs it: in this process, or
over pipeline stages (distributed/executor.py).

Scheduling, in order of priority at each step:
  1. admit waiting prompts into free cache rows (at most ``max_rows`` sequences run at once);
  2. if any running sequence still has prompt tokens outside the cache, run a *pre-fill step*: each such
     sequence brings its next chunk (at most ``chunk_size`` tokens, at most ``max_batch_tokens`` in all);
     a sequence whose prompt is done simply drops out of later chunk steps;
  3. otherwise run a *decode step*: every running sequence brings its last token.
A finished sequence frees its row at once; the engine keeps running sequences in rows 0..B-1 (moving the last
row into the hole) so the decode step reads the cache rows as a view, never as a gather.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Protocol, Sequence, Union

import torch

from .. import backends
from ..errors import SiroccoError
from ..model import Transformer
from ..model.attention import Prefill
from ..plan import BatchPlan
from .executor import Executor, LocalExecutor
from .sampling import SamplingParams, make_generator
from .text import TextTracker

log = logging.getLogger(__name__)


class StepObserver(Protocol):
    """What the engine tells a recorder (``viz.Trace``) after each step; the MoE layers call ``on_router``."""

    def on_step(self, phase: str, plan: BatchPlan, cache_positions: dict[int, int], tokens: torch.Tensor,
                seqs: list[int], prefill: str) -> None: ...

    def on_row_move(self, src: int, dst: int) -> None: ...

    def on_router(self, layer: int, chosen: torch.Tensor, weights: torch.Tensor) -> None: ...

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
    finish_reason: Optional[str] = None          # "stop" (EOS or a stop string) or "length"

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
                "tokens": self.tokens, "text": self.text, "logprobs": self.logprobs,
                "finish_reason": self.finish_reason}


@dataclass
class Event:
    """One streamed piece: a new token of sequence ``index`` and the text it completes (may be empty while a
    multi-byte character or a possible stop string is pending). ``completion`` is set on the last event."""

    index: int
    token: Optional[int]
    logprob: Optional[float]
    text: str
    completion: Optional[Completion] = None


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class _Running:
    """A sequence in flight. ``row`` is its cache row; ``cached`` how many of its tokens the cache holds."""

    out: Completion
    params: SamplingParams
    row: int
    generator: Optional[torch.Generator]
    text: Optional[TextTracker]
    cached: int = 0

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the cache (0 once decoding, when the cache also holds generated ones)."""
        return max(0, len(self.out.prompt_tokens) - self.cached)


class Engine:
    """Generates for any number of prompts with one model and one cache allocated up front.

    Args:
        model: the Transformer (any dtype/device; the cache follows it).
        tokenizer: needed for text prompts, text output and stop strings; token-id prompts work without.
        max_rows: most sequences generated at once (rows of the cache).
        chunk_size: most tokens of one prompt per pre-fill step (default: the model's smallest window, or 4096).
        max_seq_len: longest prompt + generation (sizes the cache of layers without a window; default the
            model's max_seq_len). Positions past it are refused with the limit in the message.
        max_batch_tokens: most tokens in one pre-fill step, over all sequences (default 4 * chunk_size).
        attention: pre-fill attention path, "per_sequence" (fast) or "dense" (the explicit-mask reference).
        backend: what computes the model (``backends.attach``, which changes the model in place): "torch" (the
            reference), "cpu" (C++ kernels for decode products, decode attention, one-pass RMSNorm and RoPE;
            about half a minute of build the first time, cached on disk), or "auto": "cpu" for CPU models of
            256 MiB of weights or more, where decode is memory-bound, else "torch".
        executor: runs each step's model call and sampling (default: ``LocalExecutor(model)``, this process).
        trace: a ``StepObserver`` (``viz.Trace``) that records every step's plan, cache writes and MoE routing
            (for ``sirocco viz``); None records nothing and costs nothing.

    >>> engine = Engine(model, tokenizer, max_rows=8)                      # doctest: +SKIP
    >>> [c.text for c in engine.generate(["Hello", "The window"], SamplingParams(max_tokens=16))]  # doctest: +SKIP
    """

    def __init__(self, model: Transformer, tokenizer=None, max_rows: int = 8, chunk_size: Optional[int] = None,
                 max_seq_len: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 attention: Prefill = "per_sequence", backend: Optional[str] = "auto",
                 executor: Optional[Executor] = None, trace: Optional[StepObserver] = None):
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
        self.cache = self.executor.make_cache(max_rows, self.max_seq_len)
        log.info("cache: %d rows x %s slots, %.1f MiB (%s)", max_rows,
                 sorted({self.cache.size_for(w) for w in self.args.windows()}, key=int),
                 self.cache.nbytes() / 2**20, self.dtype)
        self.backend = backends.attach(model, backend, prefill=attention)
        self.attention = attention
        self.trace = trace
        model.observe_routing(None if trace is None else trace.on_router)
        self.stats = Stats()

    # -- public API ----------------------------------------------------------------------------------------
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
        """Yield an ``Event`` per generated token of any sequence, as soon as it is sampled."""
        prompts = list(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        waiting = deque(self._request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params)))
        running: list[_Running] = []
        with torch.inference_mode():
            while waiting or running:
                while waiting and len(running) < self.max_rows:
                    out, sp = waiting.popleft()
                    running.append(self._start(out, sp, row=len(running)))
                if any(s.prompt_left for s in running):
                    new = self._prefill_step(running)
                else:
                    new = self._decode_step(running)
                for seq, token, logprob in new:
                    yield self._advance(seq, token, logprob)
                running = self._release_finished(running)

    # -- steps ---------------------------------------------------------------------------------------------
    def _prefill_step(self, running: list[_Running]) -> list[tuple[_Running, int, float]]:
        """Next chunk of every sequence with prompt left; samples for those whose prompt is now cached."""
        t0 = time.perf_counter()
        batch, lengths, budget = [], [], self.max_batch_tokens
        for s in running:
            n = min(s.prompt_left, self.chunk_size, budget)
            if s.prompt_left and n > 0:
                batch.append(s)
                lengths.append(n)
                budget -= n
        tokens = torch.tensor([t for s, n in zip(batch, lengths) for t in s.out.prompt_tokens[s.cached:s.cached + n]],
                              dtype=torch.long, device=self.device)
        plan = self.model.plan(lengths, starts=[s.cached for s in batch], rows=[s.row for s in batch],
                               cache=self.cache)
        ends = torch.tensor(lengths).cumsum(0) - 1
        finishing = [i for i, (s, n) in enumerate(zip(batch, lengths)) if n == s.prompt_left]
        logits = self.executor.forward(tokens, plan, self.cache, logits_at=ends[finishing].to(self.device))
        for s, n in zip(batch, lengths):
            s.cached += n
        if self.trace is not None:
            self.trace.on_step("prefill", plan, {s.row: s.cached for s in batch}, tokens,
                               seqs=[s.out.index for s in batch], prefill=self.attention)
        result = self._sample([batch[i] for i in finishing], logits)
        self.stats.prefill_tokens += sum(lengths)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return result

    def _decode_step(self, running: list[_Running]) -> list[tuple[_Running, int, float]]:
        """One token for every running sequence (rows are 0..B-1 here)."""
        t0 = time.perf_counter()
        tokens = torch.tensor([s.out.tokens[-1] for s in running], dtype=torch.long, device=self.device)
        plan = self.model.plan([1] * len(running), starts=[s.cached for s in running],
                               rows=[s.row for s in running], cache=self.cache)
        logits = self.executor.forward(tokens, plan, self.cache)
        for s in running:
            s.cached += 1
        if self.trace is not None:
            self.trace.on_step("decode", plan, {s.row: s.cached for s in running}, tokens,
                               seqs=[s.out.index for s in running], prefill=self.attention)
        result = self._sample(running, logits)
        self.stats.decode_tokens += len(running)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        return result

    def _sample(self, seqs: list[_Running], logits: Optional[torch.Tensor]) -> list[tuple[_Running, int, float]]:
        if not seqs:
            return []
        tokens, logprobs = self.executor.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return list(zip(seqs, tokens, logprobs))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _request(self, index: int, prompt: Prompt, params: SamplingParams) -> tuple[Completion, SamplingParams]:
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
        return Completion(index=index, prompt=text, prompt_tokens=ids), params

    def _start(self, out: Completion, params: SamplingParams, row: int) -> _Running:
        gen = make_generator(params.seed, self.device) if params.temperature > 0 else None
        text = TextTracker(self.tokenizer, out.prompt_tokens, params.stop) if self.tokenizer is not None else None
        return _Running(out=out, params=params, row=row, generator=gen, text=text)

    def _advance(self, seq: _Running, token: int, logprob: float) -> Event:
        """Append a sampled token, decide whether the sequence is done, and say what text it adds."""
        out, p = seq.out, seq.params
        out.tokens.append(token)
        out.logprobs.append(logprob)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        piece = ""
        if p.stop_on_eos and eos is not None and token == eos:
            out.finish_reason = "stop"
        elif seq.text is not None:
            piece, hit = seq.text.push(token)
            if hit:
                out.finish_reason = "stop"
        if out.finish_reason is None and (len(out.tokens) >= p.max_tokens
                                          or len(out.prompt_tokens) + len(out.tokens) >= self.max_seq_len):
            out.finish_reason = "length"
        if out.finish_reason is not None:
            if seq.text is not None:
                piece += seq.text.finish()
                out.text = seq.text.text
            return Event(out.index, token, logprob, piece, completion=out)
        return Event(out.index, token, logprob, piece)

    def _release_finished(self, running: list[_Running]) -> list[_Running]:
        """Drop finished sequences and move survivors from high rows into the freed low rows."""
        alive = [s for s in running if s.out.finish_reason is None]
        if len(alive) == len(running):
            return running
        n = len(alive)
        free = sorted(set(range(n)) - {s.row for s in alive})
        for s in [s for s in alive if s.row >= n]:
            dst = free.pop(0)
            self.cache.move_row(s.row, dst)
            if self.trace is not None:
                self.trace.on_row_move(s.row, dst)
            s.row = dst
        return sorted(alive, key=lambda s: s.row)
