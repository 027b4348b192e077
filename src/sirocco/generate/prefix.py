"""The prefix store: pre-filled prompt states kept between requests, so that a prompt which starts with a stored
one continues from it instead of pre-filling those tokens again (a chat re-sends its whole history every turn).

What is stored. When a sequence's prompt has been pre-filled, the engine hands its cache row to ``save``: for each
layer, the keys and values the row holds then, with the prompt's tokens. Only pre-filled positions are stored,
never generated ones: a generated token's keys come from the decode path (other kernels, other rounding), while a
later request that re-sends it pre-fills it. A restore (``lookup``, then ``restore``) copies them into a new
request's row, which then starts with ``cached = m``. Drafts (speculative decoding) are written, and rolled back,
only after the prompt is stored, so they never reach the store.

When a stored state is exact. A layer of S slots holds positions ``max(0, n - S) .. n - 1`` of an n-token prompt,
position p in slot ``p % S`` (cache.py):

  * n <= S (a layer without a window, S = max_seq_len; or a windowed one whose ring has not wrapped): slots
    0..n-1 hold positions 0..n-1, and their first m slots are the state after any m <= n of those tokens;
  * n > S (the ring has wrapped): the positions before n - S are overwritten. After m tokens a later query can
    still see positions ``m - W + 1 .. m - 1``; the ring has them iff ``m - W + 1 >= n - S``, i.e.
    ``m >= n - 1 - (S - W)``: with S = W, m is n - 1 or n; with the k spare slots of an engine that speculates
    (S = W + k, cache.py), k more positions back. The whole ring is restored as it is: a slot that holds a
    position >= m is read by the plan as the position S earlier, outside the window of every later query, until
    the row's own writes replace it (as the slot of a rolled-back draft is).

A stored prompt is usable at m iff every layer allows it (so a model with some windowed layers is decided per
layer). A request reuses ``m = min(common prefix, len(prompt) - 1)`` tokens, at least ``min_tokens``, from the
entry that allows the largest m; the last prompt token always goes through the model, whose logits give the
first generated token. With no such entry, the prompt is pre-filled cold: never a wrong cache.

Worked example, W = S = 4, the 8-token prompt a0..a7 stored: the ring holds a4 a5 a6 a7 in slots 0 1 2 3.

    request a0..a7 b8 b9    m = 8: restore the ring, pre-fill b8 b9 at positions 8, 9
    request a0..a7          m = 7 (the same prompt): restore the ring, pre-fill a7 again into slot 3. The prefix
                            the plan reads for it is slots 3 0 1 2 as positions 3 4 5 6; slot 3 (a7) stands for
                            position 3, outside query 7's window (positions 4..7)
    request a0..a5 c6 c7    m = 6 < n - 1 = 7: position 3, which query 6 sees, is gone: cold pre-fill

Without a window (S = max_seq_len >= 8) the three requests reuse 8, 7 and 6 tokens.

Exactness. The restored keys and values are the bits a pre-fill of those tokens computed. The continuation's
pre-fill chunks start at m instead of at the cold run's chunk boundaries: where m is one of them (a multiple of
the chunk size, the stored prompt pre-filled in whole chunks up to it) the warm answer has the cold one's bits;
elsewhere they differ by the rounding that separates two chunkings of one prompt (a chunk's matrix products may
round by its number of rows), which is also the difference between a request's cold runs alone and beside others.

Memory. At most ``budget`` bytes of keys and values, counted for every layer of the model: on pipeline ranks each
holds its own layers' part, and every rank counts the same bytes, so all of them make the same decisions (they
see the same tokens in the same order). The least recently used entry goes first. A new prompt that extends a
stored one drops it when the new state has no wrapped layer (the longer state serves every prefix of the shorter
one): a chat keeps one entry per conversation, its latest turn. Where rings have wrapped, the earlier turns stay,
as snapshots for a request that diverges after them.

Lookups compare a request with the entries that share its first ``min_tokens`` tokens (slices compared in C, a
binary search for the first difference): nothing in proportion to the store's size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..cache import RollingCache

DEFAULT_MIN_TOKENS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (tuples or lists of one kind).

    >>> common_prefix((1, 2, 3, 4), (1, 2, 5)), common_prefix((1, 2), (1, 2, 3)), common_prefix((), (1,))
    (2, 2, 0)
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n              # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False)
class Entry:
    """A stored prompt state. ``kv[layer]`` = (keys, values), each ``(n_kv_heads, kept, head_dim)``: slots
    0..n-1 of the layer's row, or the whole ring (``kept = S``) for a layer in ``rings``."""

    tokens: tuple[int, ...]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    rings: frozenset[int]
    lowest: int                  # the smallest m at which every layer's state is exact
    nbytes: int                  # over every layer of the model (see the module docstring)


@dataclass
class Hit:
    """The entry a request continues from, and how many of its tokens it reuses."""

    entry: Entry
    tokens: int


@dataclass
class PrefixStats:
    queries: int = 0             # prompts looked up
    hits: int = 0                # prompts that continued from a stored state
    hit_tokens: int = 0          # prompt tokens restored instead of pre-filled
    saved: int = 0               # states stored
    evicted: int = 0             # states dropped to make room (not those another entry contains)


class PrefixStore:
    """Stored prompt states over one engine's cache; see the module docstring. One thread calls it (the engine's).

    Args:
        cache: the engine's cache (this rank's layers).
        n_kv_heads, head_dim: the model's, to count the bytes of every layer on every rank alike.
        budget: most bytes of keys and values kept.
        min_tokens: the fewest tokens worth reusing, and how many first tokens the lookups index by.

    >>> from sirocco.config import preset
    >>> args = preset("tiny", sliding_window=4, max_seq_len=64)
    >>> store = PrefixStore(RollingCache(args, rows=2), args.n_kv_heads, args.head_dim, budget=2**20, min_tokens=2)
    >>> store.save([1, 2, 3, 4, 5, 6, 7, 8], row=0)      # row 0 holds these 8 pre-filled positions
    >>> hit = store.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> hit.tokens, store.restore(hit, row=1)            # row 1 now starts at position 8
    (8, 8)
    >>> store.lookup([1, 2, 3, 4, 5, 6, 0, 0]) is None   # diverges at 6 < 7 = lowest(8): cold
    True
    """

    def __init__(self, cache: RollingCache, n_kv_heads: int, head_dim: int, budget: int,
                 min_tokens: int = DEFAULT_MIN_TOKENS):
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
        if budget < 0:
            raise ValueError(f"the prefix store's budget must be >= 0 bytes, got {budget}")
        self.cache, self.budget, self.min_tokens = cache, budget, min_tokens
        self.windows = list(cache.windows)
        self.sizes = [cache.size_for(w) for w in self.windows]
        itemsize = next(iter(cache.layers.values())).k.element_size() if cache.layers else 2
        self.position_bytes = 2 * n_kv_heads * head_dim * itemsize      # keys + values of one layer
        self.stats = PrefixStats()
        self.nbytes = 0
        self._lru: OrderedDict[Entry, None] = OrderedDict()
        self._buckets: dict[tuple[int, ...], list[Entry]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    # -- what a state of n tokens allows ------------------------------------------------------------------------
    def lowest(self, n: int) -> int:
        """The smallest m at which the state after n tokens is exact in every layer (0: any m <= n). With W = S = 4
        in every layer, 8 tokens have wrapped the rings (lowest 7) and 3 have not (lowest 0)."""
        lo = 0
        for w, size in zip(self.windows, self.sizes):
            if n > size:
                assert w is not None, "a layer without a window holds every position"
                lo = max(lo, n - 1 - (size - w))
        return lo

    def cost(self, n: int) -> int:
        """Bytes of the state after n tokens, over every layer of the model."""
        return sum(min(n, size) for size in self.sizes) * self.position_bytes

    # -- the engine's calls ------------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> Optional[Hit]:
        """The stored state a prompt continues from (the largest exact m, at least ``min_tokens``), or None."""
        self.stats.queries += 1
        if len(tokens) - 1 < self.min_tokens:
            return None
        req = tuple(tokens)
        best: Optional[Hit] = None
        for e in self._buckets.get(req[:self.min_tokens], ()):
            m = min(common_prefix(e.tokens, req), len(req) - 1)
            if m >= max(self.min_tokens, e.lowest) and (best is None or m > best.tokens):
                best = Hit(e, m)
        if best is not None:
            self._lru.move_to_end(best.entry)
            self.stats.hits += 1
            self.stats.hit_tokens += best.tokens
        return best

    def restore(self, hit: Hit, row: int) -> int:
        """Copy a hit's state into cache row ``row``; returns the positions it now holds (``hit.tokens``)."""
        e, m = hit.entry, hit.tokens
        for i, layer in self.cache.layers.items():
            k, v = e.kv[i]
            if i in e.rings:
                layer.k[row].copy_(k)
                layer.v[row].copy_(v)
            else:
                layer.k[row, :, :m].copy_(k[:, :m])
                layer.v[row, :, :m].copy_(v[:, :m])
        return m

    def save(self, tokens: Sequence[int], row: int) -> None:
        """Store the state of cache row ``row``, which holds exactly the pre-filled ``tokens``."""
        n = len(tokens)
        if n < self.min_tokens:
            return
        t = tuple(tokens)
        bucket = self._buckets.get(t[:self.min_tokens], [])
        for e in bucket:
            if e.tokens == t or (e.lowest == 0 and len(e.tokens) > n and e.tokens[:n] == t):
                self._lru.move_to_end(e)                 # already stored, or inside a state that serves it
                return
        nbytes = self.cost(n)
        if nbytes > self.budget:
            return
        lowest = self.lowest(n)
        if lowest == 0:                                  # this state serves every prefix: drop those it contains
            for e in [e for e in bucket if len(e.tokens) < n and t[:len(e.tokens)] == e.tokens]:
                self._remove(e)
        while self.nbytes + nbytes > self.budget:
            self._remove(next(iter(self._lru)))
            self.stats.evicted += 1
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        rings = set()
        for i, layer in self.cache.layers.items():
            if n > layer.size:
                rings.add(i)
                kv[i] = (layer.k[row].clone(), layer.v[row].clone())
            else:
                kv[i] = (layer.k[row, :, :n].clone(), layer.v[row, :, :n].clone())
        entry = Entry(t, kv, frozenset(rings), lowest, nbytes)
        self._lru[entry] = None
        self._buckets.setdefault(t[:self.min_tokens], []).append(entry)
        self.nbytes += nbytes
        self.stats.saved += 1

    def clear(self) -> None:
        for e in list(self._lru):
            self._remove(e)

    def _remove(self, e: Entry) -> None:
        del self._lru[e]
        key = e.tokens[:self.min_tokens]
        bucket = self._buckets[key]
        bucket.remove(e)
        if not bucket:
            del self._buckets[key]
        self.nbytes -= e.nbytes
