"""Drafters: what proposes the tokens a speculative step verifies (speculation.py runs them, sampling.py verifies).

Each step, the engine asks its drafter for up to k tokens to follow each drafting sequence; the target model then
computes the logits of all of them in one forward and keeps the longest prefix it agrees with (greedy) or what
the rejection rule accepts (sampled), plus one token of its own. The drafters:

  * ``NgramDrafter`` (prompt lookup): the longest recent n-gram of the sequence (prompt and generated tokens) that
    also occurs earlier in it proposes the tokens that followed that earlier occurrence. It costs a dictionary
    lookup, needs no model, and pays where the output copies its input or repeats itself.
  * ``ModelDrafter``: a smaller model with the same vocabulary, run in this process over a cache of its own,
    k steps of decode per proposal, rolled back with the target when drafts are rejected.
  * ``KnownDrafter``: a known continuation, each token right with a chosen probability: for benchmarks (the
    tokens/s a drafter of that acceptance would give), tests and pictures.

A drafter keeps state per sequence, keyed by request id (``release`` forgets it); it is told nothing of
rejections: each proposal brings the sequence as it now is, and a drafter that cached more than that (the model
drafter) rolls back to the common prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..cache import RollingCache
from ..model import Transformer
from .sampling import SamplingParams, filter_logits, make_generator


@dataclass
class DraftRequest:
    """One sequence asking for a draft.

    Attributes:
        key: the request id; a drafter's state for the sequence is kept under it.
        row: the sequence's cache row in the target's cache (a model drafter's own cache mirrors the rows).
        prompt, generated: the sequence so far; its last token is the one the target's step starts from.
        k: most tokens to propose.
        params: the sequence's sampling params (a model drafter samples its drafts as the target will).
    """

    key: str
    row: int
    prompt: Sequence[int]
    generated: Sequence[int]
    k: int
    params: SamplingParams = field(default_factory=SamplingParams)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.generated)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return int(self.prompt[i]) if i < n else int(self.generated[i - n])


@dataclass
class Draft:
    """Proposed tokens, and the distributions they were drawn from ((len(tokens), V)), or None where the drafter
    chose them without one (verification then takes q one-hot on each token)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """What the engine asks of a drafter. ``costly``: whether proposing costs a model's forwards (the engine then
    decides how many tokens to ask for before asking; a free drafter is asked for its longest proposal first)."""

    costly: bool

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """Up to ``k`` tokens for each request (fewer, or none, where the drafter has nothing to propose)."""
        ...

    def release(self, key: str) -> None:
        """The sequence finished or was aborted: forget it."""
        ...

    def move_row(self, src: int, dst: int) -> None:
        """The engine moved a sequence's cache row from ``src`` to ``dst``."""
        ...


class NgramIndex:
    """One sequence's n-grams for 1 <= n <= ``n_max``: each mapped to where the token after its most recent
    occurrence is, kept up to date as tokens are appended (``extend``), so a lookup costs one dictionary access per n.

    Worked example, n_max = 2, tokens a b c a b: the 2-grams with a token after them are (a b) -> 2, (b c) -> 3,
    (c a) -> 4; the sequence ends in (a b), found with its follower at 2: the proposal is c, then a b (the tokens
    after c, read on past the end of the sequence as the repetition continues: position 2 + i for i >= 3 is the
    proposal's own token i - 3).

    >>> index = NgramIndex(2)
    >>> index.extend([1, 2, 3, 1, 2])
    >>> index.propose(5, min_n=1)
    [3, 1, 2, 3, 1]
    """

    def __init__(self, n_max: int):
        self.n_max = n_max
        self.tokens: list[int] = []
        self.after: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max + 1)]   # by n: gram -> follower

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            j = len(self.tokens)                  # the position of t: it follows the n-grams ending before it
            for n in range(1, min(self.n_max, j) + 1):
                self.after[n][tuple(self.tokens[j - n:j])] = j
            self.tokens.append(int(t))

    def propose(self, k: int, min_n: int = 1) -> list[int]:
        """Up to k tokens after the longest suffix n-gram (n_max down to min_n) seen earlier with a follower."""
        seq, end = self.tokens, len(self.tokens)
        for n in range(min(self.n_max, end), min_n - 1, -1):
            j = self.after[n].get(tuple(seq[end - n:]))
            if j is not None:
                out: list[int] = []
                for i in range(k):
                    out.append(seq[j + i] if j + i < end else out[j + i - end])
                return out
        return []


class NgramDrafter:
    """Prompt lookup: proposes the continuation of the longest recent suffix n-gram (``n`` down to ``min_n``) found
    earlier in the sequence, prompt and generated tokens alike (see ``NgramIndex``). No model, no cache."""

    costly = False

    def __init__(self, n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= n:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min_n <= n, got n={n}, min_n={min_n}")
        self.n, self.min_n = n, min_n
        self._index: dict[str, NgramIndex] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            index = self._index.setdefault(r.key, NgramIndex(self.n))
            if len(index.tokens) > len(r):
                raise ValueError(f"request {r.key!r}: the sequence has {len(r)} tokens, fewer than the "
                                 f"{len(index.tokens)} it had: a sequence only grows")
            index.extend([r.token(i) for i in range(len(index.tokens), len(r))])
            out.append(Draft(index.propose(r.k, self.min_n) if r.k > 0 else []))
        return out

    def release(self, key: str) -> None:
        self._index.pop(key, None)

    def move_row(self, src: int, dst: int) -> None:
        pass


@dataclass
class _DraftRow:
    row: int
    fed: list[int]                        # tokens the draft cache holds, positions 0 .. len - 1
    generator: torch.Generator | None


class ModelDrafter:
    """A draft model with the target's vocabulary, over a cache of its own with the target's rows.

    A proposal of k tokens for a set of sequences: one forward that feeds each sequence's tokens the draft cache
    does not hold yet (the last token, or two after a draft was all accepted, the whole prompt the first time, in
    chunks of ``chunk_size``), then k - 1 decode steps; all sequences together in each. Greedy sequences take the
    draft's argmax; sampled ones draw from its distribution (filtered as the target's is) with a generator of
    their own, and hand those distributions to the rejection rule. Before proposing, each sequence's draft cache
    rolls back to the longest prefix of what it fed that the sequence still has (the accepted drafts): no more
    bookkeeping than a count, since the cache has room for the drafts beside the window (``spare_slots``).

    Args:
        model: the draft model (a ``Transformer`` on the target's device; its backend as the caller attached it).
        max_rows, max_seq_len: the target engine's.
        draft_tokens: the most tokens of one proposal (the cache's spare slots are sized from it).
        chunk_size: most prompt tokens per forward when catching up (default: the draft model's smallest window).
    """

    costly = True

    def __init__(self, model: Transformer, max_rows: int, max_seq_len: int, draft_tokens: int,
                 chunk_size: int | None = None):
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.draft_tokens = draft_tokens
        # Two tokens beside the window besides the drafts: a catch-up of the last accepted draft and the target's
        # token runs as one decode sequence.
        self.cache = RollingCache(model.args, rows=max_rows, dtype=param.dtype, device=param.device,
                                  max_seq_len=max_seq_len, spare_slots=draft_tokens + 1)
        self.decode_tokens = draft_tokens + 2           # the longest catch-up that runs as a decode sequence
        windows = [w for w in model.args.windows() if w is not None]
        self.chunk_size = int(chunk_size or (min(windows) if windows else 4096))
        self._rows: dict[str, _DraftRow] = {}

    # -- the Drafter protocol ----------------------------------------------------------------------------------
    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        if not requests:
            return []
        states = [self._state(r) for r in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        with torch.inference_mode():
            # Catch up: feed what each sequence's draft cache lacks, in chunks; a sequence's first draft token comes
            # from the logits of its last chunk.
            pending = {i: len(st.fed) for i, st in enumerate(states) if requests[i].k > 0}
            while pending:
                # Short catch-ups run as decode sequences (each token with the decode op, as in the target's steps),
                # packed first; the first catch-up of a long prompt pre-fills in chunks after them.
                short = [i for i in pending if len(requests[i]) - pending[i] <= self.decode_tokens]
                order = short + [i for i in pending if i not in short]
                lengths = [min(len(requests[i]) - pending[i], self.chunk_size) for i in order]
                tokens = [requests[i].token(p) for i, n in zip(order, lengths, strict=True)
                          for p in range(pending[i], pending[i] + n)]
                logits = self._forward(tokens, [pending[i] for i in order], lengths, [states[i].row for i in order],
                                       len(short))
                at = 0
                for j, (i, n) in enumerate(zip(order, lengths, strict=True)):
                    states[i].fed += tokens[at:at + n]
                    at += n
                    pending[i] += n
                    if pending[i] == len(requests[i]):
                        del pending[i]
                        self._choose(logits[j], requests[i], states[i], drafts[i], probs[i])
            # Then one decode step per further draft token, for the sequences that want more.
            while True:
                more = [i for i, r in enumerate(requests) if 0 < len(drafts[i]) < r.k]
                if not more:
                    break
                logits = self._forward([drafts[i][-1] for i in more], [len(states[i].fed) for i in more],
                                       [1] * len(more), [states[i].row for i in more], len(more))
                for j, i in enumerate(more):
                    states[i].fed.append(drafts[i][-1])
                    self._choose(logits[j], requests[i], states[i], drafts[i], probs[i])
        return [Draft(d, torch.stack(p) if p and r.params.temperature > 0 else None)
                for d, p, r in zip(drafts, probs, requests, strict=True)]

    def release(self, key: str) -> None:
        self._rows.pop(key, None)

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
        for st in self._rows.values():
            if st.row == src:
                st.row = dst

    # -- start-up measurement ----------------------------------------------------------------------------------
    def decode_step(self, rows: int) -> None:
        """One draft decode step of ``rows`` sequences at position 0 of rows 0.. of the draft cache (to time it;
        those rows are overwritten by the sequences they serve)."""
        with torch.inference_mode():
            self._forward([0] * rows, [0] * rows, [1] * rows, list(range(rows)), rows)

    # -- internals -----------------------------------------------------------------------------------------
    def _state(self, r: DraftRequest) -> _DraftRow:
        st = self._rows.get(r.key)
        if st is None:
            p = r.params
            gen = make_generator(None if p.seed is None else p.seed + 1, self.device) if p.temperature > 0 else None
            st = self._rows[r.key] = _DraftRow(r.row, [], gen)
        if st.row != r.row:
            raise RuntimeError(f"request {r.key!r}: the draft cache holds it in row {st.row}, the engine in row "
                               f"{r.row} (a row move the drafter was not told of)")
        keep = 0                                      # roll back to the prefix the sequence still has
        while keep < len(st.fed) and keep < len(r) - 1 and st.fed[keep] == r.token(keep):
            keep += 1
        del st.fed[keep:]
        return st

    def _forward(self, tokens: list[int], starts: list[int], lengths: list[int], rows: list[int],
                 decode: int) -> torch.Tensor:
        """Logits (B, V) of each sequence's last token."""
        plan = self.model.plan(lengths, starts=starts, rows=rows, cache=self.cache, decode=decode)
        ends = torch.tensor(lengths).cumsum(0) - 1
        return self.model(torch.tensor(tokens, dtype=torch.long, device=self.device), plan, self.cache,
                          logits_at=ends.to(self.device))

    def _choose(self, logits: torch.Tensor, r: DraftRequest, st: _DraftRow, out: list[int],
                probs: list[torch.Tensor]) -> None:
        p = r.params
        if p.temperature <= 0:
            out.append(int(torch.argmax(logits)))
            return
        q = torch.softmax(filter_logits(logits, p.temperature, p.top_k, p.top_p), dim=-1)
        out.append(int(torch.multinomial(q, 1, generator=st.generator)))
        probs.append(q)


class KnownDrafter:
    """Proposes each sequence's known continuation, every token of it right with probability ``p`` (a seeded draw;
    a wrong one is a neighbouring id): the drafter of the verification-cost benchmark (tokens/s against the
    acceptance rate a real drafter would reach), of tests and of pictures. ``continuations`` maps a prompt's ids
    (a tuple) to the tokens a plain run generated after it."""

    costly = False

    def __init__(self, continuations: Mapping[tuple[int, ...], Sequence[int]], vocab_size: int, p: float = 1.0,
                 seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.continuations = {tuple(int(t) for t in k): [int(t) for t in v] for k, v in continuations.items()}
        self.vocab_size, self.p = vocab_size, p
        self._random = torch.Generator().manual_seed(seed)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            known = self.continuations.get(tuple(int(t) for t in r.prompt), [])
            tokens = []
            for t in known[len(r.generated):len(r.generated) + r.k]:
                right = self.p >= 1.0 or float(torch.rand((), generator=self._random)) < self.p
                tokens.append(t if right else (t + 1) % self.vocab_size)
            out.append(Draft(tokens))
        return out

    def release(self, key: str) -> None:
        pass

    def move_row(self, src: int, dst: int) -> None:
        pass
