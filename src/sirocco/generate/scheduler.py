"""What runs in the next step: the waiting queue, cache rows, the step's token budget, finishing and aborts.

The scheduler only does host bookkeeping on plain integers; it never touches tensors. The engine asks it for a
step (``schedule``), runs that step through its executor, appends the sampled tokens, and hands finished
sequences back (``release``). Every pipeline rank runs its own scheduler on the same calls, so every decision
here is a pure function of the calls made so far (no clocks, no randomness, no dict-order surprises).

Rules, applied at every step boundary:

  * admission: waiting requests enter free cache rows first come, first served, as soon as a row is free
    (at most ``max_rows`` sequences run at once);
  * mixed steps (``mixed=True``): the step carries the next token of every decoding sequence (1 each), then
    pre-fill chunks of the sequences with prompt left, in admission order, each at most ``chunk_size`` tokens,
    up to ``max_batch_tokens`` tokens in all. Decode tokens are never left out (a budget smaller than the
    decoding rows only delays pre-fill);
  * ``mixed=False``: while any sequence has prompt left the step is pre-fill chunks only (same budget and
    order); otherwise a decode step of every running sequence;
  * compaction: a finished or aborted sequence frees its row at once; the running sequence in the highest row
    moves into the hole, so running sequences always hold rows 0..B-1 and a decode step reads the cache rows
    as a view.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Seq(Protocol):
    """What the scheduler reads of a running sequence (the engine's ``_Running``)."""

    row: int
    order: int                     # admission order, for first come, first served pre-fill

    @property
    def prompt_left(self) -> int: ...

    @property
    def request_id(self) -> str: ...


S = TypeVar("S", bound=Seq)
W = TypeVar("W")                   # a waiting request, opaque to the scheduler


@dataclass
class Step(Generic[S]):
    """One step: ``seqs[i]`` brings ``lengths[i]`` new tokens; packing order is list order.

    Decoding sequences (one token each) come first, then pre-fill chunks; when every length is 1 (the plan's
    decode path, pre-fill chunks of one token included) the sequences are in row order instead.
    ``phase`` says what the sequences do: "decode" (all past their prompt), "prefill" (none), else "mixed".
    """

    seqs: list[S]
    lengths: list[int]
    phase: str


class Scheduler(Generic[W, S]):
    """The waiting queue and the running sequences of one engine (single-threaded: one caller).

    Args:
        max_rows, chunk_size, max_batch_tokens, mixed: see the module docstring.
        start: turns a waiting request into a running sequence in a given row (the engine's ``_start``).
        move_row: copies a cache row ``src`` into ``dst`` (compaction).
        request_id: the id of a waiting request.
    """

    def __init__(self, max_rows: int, chunk_size: int, max_batch_tokens: int, mixed: bool,
                 start: Callable[[W, int, int], S], move_row: Callable[[int, int], None],
                 request_id: Callable[[W], str]):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        self.max_rows, self.chunk_size = max_rows, chunk_size
        self.max_batch_tokens, self.mixed = max_batch_tokens, mixed
        self._start, self._move_row, self._id_of = start, move_row, request_id
        self.waiting: deque[W] = deque()
        self.running: list[S] = []            # sorted by row; rows are 0..len-1
        self._admitted = 0

    # -- queue ---------------------------------------------------------------------------------------------
    def add(self, request: W) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> tuple[W | None, S | None]:
        """Remove a request: (the waiting request, None), (None, the running sequence, its row already freed
        and the rows compacted), or (None, None) if it is neither waiting nor running."""
        for w in self.waiting:
            if self._id_of(w) == request_id:
                self.waiting.remove(w)
                return w, None
        for s in self.running:
            if s.request_id == request_id:
                self.release([s])
                return None, s
        return None, None

    # -- steps ---------------------------------------------------------------------------------------------
    def admit(self) -> list[S]:
        """Move waiting requests into free rows, first come first served; returns the new sequences."""
        new = []
        while self.waiting and len(self.running) < self.max_rows:
            seq = self._start(self.waiting.popleft(), len(self.running), self._admitted)
            self._admitted += 1
            self.running.append(seq)
            new.append(seq)
        return new

    def schedule(self) -> Step[S] | None:
        """Admit, then choose the next step (None when nothing is running)."""
        self.admit()
        if not self.running:
            return None
        prefilling = sorted((s for s in self.running if s.prompt_left), key=lambda s: s.order)
        decoding = [s for s in self.running if not s.prompt_left]
        if not self.mixed:
            if not prefilling:
                return Step(decoding, [1] * len(decoding), "decode")
            decoding = []
        seqs, lengths = list(decoding), [1] * len(decoding)
        budget = self.max_batch_tokens - len(decoding)
        for s in prefilling:
            n = min(s.prompt_left, self.chunk_size, budget)
            if n <= 0:
                break
            seqs.append(s)
            lengths.append(n)
            budget -= n
        if not seqs:         # cannot happen with max_batch_tokens >= 1, kept as a guard against a stall
            raise RuntimeError("the step budget admits no tokens")
        phase = "decode" if len(seqs) == len(decoding) else "mixed" if decoding else "prefill"
        if all(n == 1 for n in lengths):
            # The plan's decode path (chunks of one token included): pack in row order so that the cache rows
            # are read as a view.
            order = sorted(range(len(seqs)), key=lambda i: seqs[i].row)
            return Step([seqs[i] for i in order], [1] * len(seqs), phase)
        return Step(seqs, lengths, phase)

    def release(self, done: Iterable[S]) -> None:
        """Free the rows of finished (or aborted) sequences and compact (``move_row`` for each move)."""
        gone = {id(s) for s in done}
        if not gone:
            return
        alive = [s for s in self.running if id(s) not in gone]
        n = len(alive)
        free = sorted(set(range(n)) - {s.row for s in alive})
        for s in [s for s in alive if s.row >= n]:
            dst = free.pop(0)
            self._move_row(s.row, dst)
            s.row = dst
        self.running = sorted(alive, key=lambda s: s.row)
