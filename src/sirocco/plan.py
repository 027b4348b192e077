"""The batch plan: what one forward step needs to know about its packed sequences, built once per step.

Several sequences are packed into one flat token tensor with no padding. For each step the engine describes each
sequence by three host integers:

    start   absolute position of its first new token (= tokens of it already in the cache; 0 without cache)
    length  new tokens in this step
    row     the cache row it owns (unused without a cache)

From these the plan builds, once for all layers:
  * ``positions``: the absolute position of every packed token (for RoPE);
  * one ``WindowPlan`` per distinct window among the layers, holding the cache slots to read and write and
    the attention mask in the forms the attention ops read (dense, per-sequence blocks, decode slots).

The mask is always the same predicate, over (sequence id, absolute position) of a query and of a key::

    allowed(q, k) = seq(q) == seq(k)  and  pos(k) <= pos(q)  and  pos(k) > pos(q) - W

(W keys, counting the query itself). The three masks of the reference design are this predicate over three
key layouts:

  1. first pre-fill chunk: keys are the new tokens themselves -> block-diagonal causal, windowed;
  2. later chunks: each sequence's keys are [its cached keys, oldest first ; its new keys] -> block-diagonal
     aligned at the bottom right, windowed (also right for chunks longer than W);
  3. decode (one new token per sequence, written to the cache first): keys are the slots of the sequence's own
     row, valid for the first ``min(start + 1, S)`` slots -> block-diagonal causal with offset padded keys.

A decode sequence may also bring several tokens (a draft to verify, generate/speculation.py): every one of its
keys is written first, then each of its queries attends over the row like a decode token at its own position,
masked to its own window (never to the later drafts). For that a windowed row needs room for the draft beside
the window: S = W + k slots (cache.py), so that writing k draft keys never overwrites a key still inside the
window of an earlier query; the rejected drafts' keys are dropped by forgetting them (the row's cached count goes
back) and overwritten later.

Decode keys are read in **canonical order**: entry l of a query's keys is the position of its window congruent
to l modulo ``span`` = min(W, S) (S without a window), that is the slot order of a ring of exactly the window.
With S = span this is slot l itself (the slots as stored); with S > span the plan hands the attention op a map
(``decode_slots``) from entry to slot, so a ring with room for drafts gives each query the bits of the plain
ring. Worked example, W = 4, S = 6 (room for 2 drafts), a query at position 9: its window is positions 6..9,
canonical entries l = 0..3 hold positions 8, 9, 6, 7 (8 % 4 = 0, ...), stored in slots 8 % 6 = 2, 3, 0, 1: the
map is [2, 3, 0, 1]. A ring of 4 slots would hold them in slots 0..3 in the same order.

Worked example (W = 3, no cache): seqlens [3, 2] pack tokens a0 a1 a2 b0 b1; the dense mask (rows: queries,
columns: keys) is::

        a0 a1 a2 b0 b1
    a0   1  .  .  .  .
    a1   1  1  .  .  .
    a2   1  1  1  .  .
    b0   .  .  .  1  .
    b1   .  .  .  1  1
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def unrotate_slots(seen: int, size: int) -> list[int]:
    """Slots of a rolling row of ``size`` slots holding its last ``min(seen, size)`` tokens, oldest first.

    >>> unrotate_slots(2, 3), unrotate_slots(4, 3), unrotate_slots(7, 3)
    ([0, 1], [1, 2, 0], [1, 2, 0])
    """
    if seen < size:
        return list(range(seen))
    k = seen % size
    return list(range(k, size)) + list(range(k))


def allowed(q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor, k_pos: torch.Tensor,
            window: int | None) -> torch.Tensor:
    """The attention predicate (broadcasting): same sequence, causal, and within the window."""
    ok = (q_seq == k_seq) & (k_pos <= q_pos)
    if window is not None:
        ok &= k_pos > q_pos - window
    return ok


@dataclass
class WindowPlan:
    """Attention inputs for every layer that has this window, for one step.

    Shapes: T new tokens in the step, Tk keys (prefix keys + new keys), B sequences.
    """

    window: int | None
    cache_len: int | None         # S, slots per cache row; None without a cache
    q_seqlens: list[int]             # new tokens per sequence
    kv_seqlens: list[int]            # keys per sequence: cached prefix (oldest first) + new tokens
    prefix_lens: list[int]           # cached keys read back per sequence (0 without cache / first chunk)
    decode: bool                     # decode sequences: each query attends over its cache row in place
    q_seq: torch.Tensor              # (T,)  sequence index of each query
    q_pos: torch.Tensor              # (T,)  absolute position of each query
    k_seq: torch.Tensor              # (Tk,) sequence index of each key
    k_pos: torch.Tensor              # (Tk,) absolute position of each key
    # cache traffic (None without a cache)
    rows: list[int] | None = None
    write_src: torch.Tensor | None = None    # (n_write,) index into the T new tokens
    write_row: torch.Tensor | None = None    # (n_write,) cache row
    write_slot: torch.Tensor | None = None   # (n_write,) slot in the row, position % S
    prefix_row: torch.Tensor | None = None   # (n_prefix,) cache row of each prefix key
    prefix_slot: torch.Tensor | None = None  # (n_prefix,) slot of each prefix key, oldest first
    key_order: torch.Tensor | None = None    # (Tk,) index into cat([prefix keys, new keys])
    decode_len: int = 0                          # keys each decode query reads, in canonical order
    span: int = 0                                # positions a ring of exactly the window holds: min(W, S)
    decode_fill: list[int] | None = None      # (T,) valid keys of each decode query: min(position + 1, span)
    # Set where a decode query does not read slot l of the row at its own index: several queries per sequence, or
    # a ring larger than the window once it wraps (the op then reads rows and slots through these maps).
    query_rows: torch.Tensor | None = None    # (T,) the cache row of each decode query
    # A mixed step (see ``BatchPlan.build``): the plans of its leading one-token sequences (a decode plan) and
    # of the rest (a pre-fill plan), each over its own slice of the step's tokens. The fields above still
    # describe the whole step (what it may attend, for the trace and the dense reference).
    parts: tuple[WindowPlan, WindowPlan] | None = None

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        """(T, Tk) bool: the whole mask, for the explicit-mask reference path."""
        return allowed(self.q_seq[:, None], self.q_pos[:, None], self.k_seq[None, :], self.k_pos[None, :],
                       self.window)

    @functools.cached_property
    def blocks(self) -> list[torch.Tensor | None]:
        """Per sequence, its (L, Lk) diagonal block of the mask, or None where plain causal attention
        (square, top-left aligned, no window cut) is exact and SDPA's ``is_causal`` can be used."""
        out: list[torch.Tensor | None] = []
        q0 = k0 = 0
        for lq, lk, pre in zip(self.q_seqlens, self.kv_seqlens, self.prefix_lens, strict=True):
            if pre == 0 and (self.window is None or self.window >= lq):
                out.append(None)
            else:
                out.append(allowed(self.q_seq[q0:q0 + lq, None], self.q_pos[q0:q0 + lq, None],
                                   self.k_seq[None, k0:k0 + lk], self.k_pos[None, k0:k0 + lk], self.window))
            q0 += lq
            k0 += lk
        return out

    @functools.cached_property
    def decode_valid(self) -> torch.Tensor:
        """(T, decode_len) bool: which canonical entries of each decode query's keys it may see.

        A query at position p sees positions ``max(0, p + 1 - span) .. p``, one per residue modulo span, so
        entry l is valid iff ``l < min(p + 1, span)``. Example: span = 4, positions [1, 6] -> [[1 1 0 0],
        [1 1 1 1]]. With S = span (one token per sequence) entry l is slot l: a slot is valid iff it is filled.
        """
        filled = torch.clamp(self.q_pos + 1, max=self.span)               # (T,)
        entries = torch.arange(self.decode_len, device=self.q_pos.device)
        return entries[None, :] < filled[:, None]

    @functools.cached_property
    def decode_slots(self) -> torch.Tensor:
        """(T, decode_len) int64: the slot of each decode query's canonical entry l, ``pos % S`` with ``pos`` the
        position of its window congruent to l modulo span (see the module's docstring; entries past a query's
        fill hold an unused slot)."""
        p = self.q_pos[:, None]
        entries = torch.arange(self.decode_len, device=self.q_pos.device)[None, :]
        assert self.cache_len is not None, "decode without a cache"
        return torch.remainder(p - torch.remainder(p - entries, self.span), self.cache_len)


@dataclass
class BatchPlan:
    """One step's packed sequences: positions for RoPE and a ``WindowPlan`` per window.

    Build with ``BatchPlan.build``. The plan says *what* each query may attend; how attention is computed is
    the model's attention ops' choice (``model.attention``, ``backends``).
    """

    starts: list[int]
    lengths: list[int]
    rows: list[int] | None
    positions: torch.Tensor                    # (T,) absolute positions
    windows: dict[int | None, WindowPlan]
    decode: int | None = None               # the ``decode`` it was built with (None: the default rule)

    def for_window(self, window: int | None) -> WindowPlan:
        return self.windows[window]

    @classmethod
    def build(cls, lengths: Sequence[int], *, starts: Sequence[int] | None = None,
              rows: Sequence[int] | None = None, windows: Sequence[int | None] = (None,),
              cache_lens: dict[int | None, int] | None = None,
              device: torch.device | str = "cpu", decode: int | None = None) -> BatchPlan:
        """Plan one step.

        Args:
            lengths: new tokens per sequence, in packing order.
            starts: absolute position of each sequence's first new token (default all 0).
            rows: cache row of each sequence; give it (with ``cache_lens``) when the step uses a cache.
            windows: the windows of the model's layers (duplicates are fine).
            cache_lens: slots per row for each window, ``{window: S}``; None: no cache.
            decode: how many leading sequences are decode sequences (with a cache); default: every sequence
                when all bring one token, else the leading one-token sequences. A decode sequence of several
                tokens (a draft to verify) attends like that many decode tokens, each at its own position.

        A step with a cache whose leading sequences are decode sequences and whose others are not is a *mixed*
        step: each window's plan also carries ``parts``, a decode plan for those leading sequences and a
        pre-fill plan for the rest, so that a decode token attends with the decode op over its cache row
        whatever else shares the step (the pre-fill op gives other rounding bits for the same row).
        """
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("a step needs at least one sequence")
        if any(n <= 0 for n in lengths):
            raise ValueError(f"every sequence needs at least one new token, got lengths {lengths}")
        starts = [0] * len(lengths) if starts is None else [int(s) for s in starts]
        if len(starts) != len(lengths):
            raise ValueError(f"{len(starts)} starts for {len(lengths)} sequences")
        row_list = None if rows is None else [int(r) for r in rows]
        if cache_lens is not None:
            if row_list is None:
                raise ValueError("a step with a cache needs the cache row of each sequence")
        elif any(starts):
            raise ValueError("a step without a cache must start every sequence at position 0")
        device = torch.device(device)

        positions = torch.tensor([p for s, n in zip(starts, lengths, strict=True) for p in range(s, s + n)],
                                 dtype=torch.long, device=device)
        if decode is None:
            ones = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))   # leading one-token sequences
        elif not 0 <= decode <= len(lengths):
            raise ValueError(f"decode must count 0 to {len(lengths)} leading sequences, got {decode}")
        else:
            ones = int(decode)
        plans = {}
        for w in dict.fromkeys(windows):
            plans[w] = _window_plan(w, None if cache_lens is None else int(cache_lens[w]), starts, lengths,
                                    row_list, positions, device, decode=ones == len(lengths))
        if cache_lens is not None and row_list is not None and 0 < ones < len(lengths):
            r = row_list
            t = sum(lengths[:ones])                     # the decode sequences' tokens come first
            for w, wp in plans.items():
                S = int(cache_lens[w])
                wp.parts = (_window_plan(w, S, starts[:ones], lengths[:ones], r[:ones], positions[:t], device,
                                         decode=True),
                            _window_plan(w, S, starts[ones:], lengths[ones:], r[ones:], positions[t:], device,
                                         decode=False))
        return cls(starts=starts, lengths=lengths, rows=row_list, positions=positions, windows=plans, decode=decode)


def span_of(window: int | None, cache_len: int) -> int:
    """Positions a query's keys can span in a ring of ``cache_len`` slots: min(W, S), or S without a window.

    >>> span_of(4, 6), span_of(4096, 200), span_of(None, 512)
    (4, 200, 512)
    """
    return cache_len if window is None else min(window, cache_len)


def ring_slots(first: int, end: int, size: int) -> list[int]:
    """Slots of positions ``first .. end - 1`` in a ring of ``size`` slots, oldest first.

    >>> ring_slots(1, 4, 3), ring_slots(6, 9, 5)
    ([1, 2, 0], [1, 2, 3])
    """
    return [p % size for p in range(first, end)]


def _window_plan(window: int | None, cache_len: int | None, starts: list[int], lengths: list[int],
                 rows: list[int] | None, positions: torch.Tensor, device: torch.device,
                 decode: bool = False) -> WindowPlan:
    """Host-side index arithmetic for one window; every list becomes one small tensor. ``decode``: every
    sequence is a decode sequence (with a cache)."""
    # Built from host lists: a device-side repeat_interleave would need a sync to size its output.
    q_seq = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], dtype=torch.long, device=device)
    if cache_len is None:
        return WindowPlan(window=window, cache_len=None, q_seqlens=lengths, kv_seqlens=lengths,
                          prefix_lens=[0] * len(lengths), decode=False, q_seq=q_seq, q_pos=positions,
                          k_seq=q_seq, k_pos=positions)

    S = cache_len
    span = span_of(window, S)
    assert rows is not None, "a step with a cache needs the rows"
    for s, n in zip(starts, lengths, strict=True):
        if (window is None or window > S) and s + n > S:
            raise ValueError(f"sequence of {s + n} tokens exceeds the cache of {S} positions "
                             f"(the model's max_seq_len); shorten the prompt or the generation")
        if decode and n > 1 and s + n > S and span + n - 1 > S:
            # the write of the last draft key would overwrite a key inside the first query's window
            raise ValueError(f"a decode sequence of {n} tokens at position {s} needs a ring of at least "
                             f"{span + n - 1} slots (window {span} + {n - 1} drafts), this cache has {S}: size "
                             f"the cache with room for the drafts (RollingCache spare_slots)")
    # Writes: only the last min(n, S) new tokens of each sequence survive in its row, at slot p % S.
    write_src: list[int] = []
    write_row: list[int] = []
    write_slot: list[int] = []
    t0 = 0
    for s, n, r in zip(starts, lengths, rows, strict=True):
        for i in range(max(0, n - S), n):
            write_src.append(t0 + i)
            write_row.append(r)
            write_slot.append((s + i) % S)
        t0 += n

    def t(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    common: dict[str, Any] = dict(window=window, cache_len=S, q_seqlens=lengths, q_seq=q_seq, q_pos=positions,
                                  rows=rows, write_src=t(write_src), write_row=t(write_row),
                                  write_slot=t(write_slot), span=span)

    if decode:
        # Decode: keys are the rows themselves after the write; read only as many entries as the fullest query.
        last = [s + n - 1 for s, n in zip(starts, lengths, strict=True)]
        decode_len = min(max(last) + 1, span)
        fill = [min(p + 1, span) for s, n in zip(starts, lengths, strict=True) for p in range(s, s + n)]
        query_rows = None
        if any(n > 1 for n in lengths) or (span != S and max(last) >= span):
            query_rows = t([r for r, n in zip(rows, lengths, strict=True) for _ in range(n)])
        return WindowPlan(**common, kv_seqlens=[decode_len] * len(lengths), prefix_lens=[0] * len(lengths),
                          decode=True, k_seq=q_seq, k_pos=positions, decode_len=decode_len, decode_fill=fill,
                          query_rows=query_rows)

    # Pre-fill: each sequence's keys are its cached prefix (unrotated, oldest first) then its new keys. A ring
    # larger than the window (room for drafts) holds keys no new query may see: only the window's are read, so
    # the pre-fill op gets the keys it gets from a ring of exactly the window.
    prefix_lens = [min(s, span) for s in starts]
    prefix_row: list[int] = []
    prefix_slot: list[int] = []
    k_seq: list[int] = []
    k_pos: list[int] = []
    key_order: list[int] = []
    n_prefix = sum(prefix_lens)
    pre0 = new0 = 0
    for b, (s, n, r, c) in enumerate(zip(starts, lengths, rows, prefix_lens, strict=True)):
        for p, slot in zip(range(s - c, s), ring_slots(s - c, s, S), strict=True):   # cached positions, oldest first
            prefix_row.append(r)
            prefix_slot.append(slot)
            k_seq.append(b)
            k_pos.append(p)
            key_order.append(pre0)
            pre0 += 1
        for p in range(s, s + n):                       # new keys of this sequence
            k_seq.append(b)
            k_pos.append(p)
            key_order.append(n_prefix + new0)
            new0 += 1
    kv_seqlens = [c + n for c, n in zip(prefix_lens, lengths, strict=True)]
    return WindowPlan(**common, kv_seqlens=kv_seqlens, prefix_lens=prefix_lens,
                      decode=False, k_seq=t(k_seq), k_pos=t(k_pos), prefix_row=t(prefix_row),
                      prefix_slot=t(prefix_slot), key_order=t(key_order) if n_prefix else None)
