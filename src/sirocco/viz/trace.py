"""A recorder of what the engine and the model really did, step by step, for the pictures of ``sirocco viz``.

The engine and the model call it through one-line hooks, each behind ``if trace is not None``, so a run
without a trace pays nothing:

    engine, after each step's model call      trace.on_step("prefill" | "decode", plan, {row: cached})
    MoE feed-forward, after its top-k          trace.on_router(layer_id, chosen, weights)
    pipeline schedule, after each F/B action   trace.on_pipeline_event(rank, "F" | "B", micro_batch, t0, t1)
    engine, where it moves a cache row         trace.on_row_move(src, dst)
    engine, where it restores a stored prefix  trace.on_row_restore(row, cached, {window: S})

``on_step`` reads the step's ``BatchPlan`` duck-typed (its ``WindowPlan`` fields) and keeps, for each window:
the queries (sequence, position), the keys (sequence, position, cache slot or None for a key that is not read
from the cache) and the mask exactly as the plan lowered it for the attention code: ``decode_valid`` over the
padded cache rows for a decode step; for pre-fill ``dense`` (pre-fill path "dense") or the per-sequence
``blocks`` (path "per_sequence", a ``None`` block meaning SDPA's ``is_causal``). It also keeps each cache row's
slot -> position map, updated from the plan's own write indices (``write_row``, ``write_slot``, ``write_src``).

Worked example, W = S = 3, one prompt of 4 tokens in chunks of 3 then one decode step:

    step  phase         queries  keys (pos/slot)           row 0 after: slot 0 1 2
    0     first chunk   0 1 2    0/- 1/- 2/-                             0 1 2
    1     later chunk   3        0/0 1/1 2/2 3/-                         3 1 2
    2     decode        4        slots 0 1 2 = 3/0 4/1 2/2 (4 written first)  3 4 2

One request's view (``on_step(..., only=i)``, what the server's inside panel records through the engine's
per-request ``RowObserver``): the same recording restricted to packed sequence i of each step, its cache row and
the trace's window; its masks are kept as runs of allowed keys per query (``MaskRecord.runs``) rather than as
a matrix, so a long pre-fill chunk costs its queries plus its keys, not their product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

if TYPE_CHECKING:
    from ..plan import BatchPlan

Key = tuple[int, Optional[int], Optional[int]]      # (sequence, position or None for an empty slot, slot)


@dataclass
class MaskRecord:
    """One step's attention for one window, as the attention code saw it."""

    window: Optional[int]
    phase: str                                   # "first chunk", "later chunk", "decode" or "mixed"
    queries: list[tuple[int, int]]               # (sequence, position) of each new token
    keys: list[Key]                              # (sequence, position, slot) of each key column
    allowed: list[list[int]]                     # (queries, keys) 0/1, as lowered by the plan ([] with runs)
    lowering: str                                # "decode_valid", "dense", "blocks" or "decode_valid + ..."
    padding: Optional[int] = None                # slots read per row (decode steps)
    runs: Optional[list[list[tuple[int, int]]]] = None   # one request's view: per query, (first key, count)


@dataclass
class StepRecord:
    step: int
    kind: str                                    # what the caller said: "prefill", "decode", ...
    phase: str                                   # read from the plan (first/later chunk, decode, mixed)
    starts: list[int]
    lengths: list[int]
    rows: Optional[list[int]]
    masks: dict[Optional[int], MaskRecord]
    slots: dict[Optional[int], dict[int, list[Optional[int]]]]   # window -> row -> position per slot
    written: dict[Optional[int], list[tuple[int, int]]]           # window -> (row, slot) written this step
    cached: Optional[dict[int, int]] = None                        # what the caller said each row holds
    router: dict[int, tuple[list[list[int]], list[list[float]]]] = field(default_factory=dict)
    token_ids: Optional[list[int]] = None


def _phase(wp: Any) -> str:
    if wp.decode:
        return "verify" if max(wp.q_seqlens) > 1 else "decode"
    pre = [int(c) for c in wp.prefix_lens]
    if not any(pre):
        return "first chunk"
    return "later chunk" if all(pre) else "mixed"


def _lowered_prefill(wp: Any, prefill: str) -> tuple[torch.Tensor, str]:
    """The (T, Tk) mask of a pre-fill step as the attention code applies it."""
    if prefill == "dense":
        return wp.dense.cpu(), "dense"
    T, Tk = sum(wp.q_seqlens), sum(wp.kv_seqlens)
    out = torch.zeros(T, Tk, dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk, block in zip(wp.q_seqlens, wp.kv_seqlens, wp.blocks):
        if block is None:                        # SDPA is_causal: top-left aligned lower triangle
            block = torch.ones(lq, lk, dtype=torch.bool).tril()
        out[q0:q0 + lq, k0:k0 + lk] = block.cpu()
        q0 += lq
        k0 += lk
    return out, "blocks"


def _lowered_prefill_of(wp: Any, prefill: str, b: int) -> torch.Tensor:
    """Sequence b's (q_b, k_b) block of ``_lowered_prefill``'s mask, built alone."""
    q0, k0 = sum(wp.q_seqlens[:b]), sum(wp.kv_seqlens[:b])
    lq, lk = wp.q_seqlens[b], wp.kv_seqlens[b]
    if prefill == "dense":
        return wp.dense[q0:q0 + lq, k0:k0 + lk].cpu()
    block = wp.blocks[b]
    if block is None:
        return torch.ones(lq, lk, dtype=torch.bool).tril()
    return block.cpu().bool()


def runs(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's runs of True as (first column, count).

    >>> runs(torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool))
    [[(0, 2), (3, 1)], []]
    """
    q, k = mask.shape
    edges = torch.diff(mask.to(torch.int8), dim=1, prepend=torch.zeros(q, 1, dtype=torch.int8),
                       append=torch.zeros(q, 1, dtype=torch.int8))
    rows_s, starts = torch.nonzero(edges == 1, as_tuple=True)
    ends = torch.nonzero(edges == -1, as_tuple=True)[1]
    out: list[list[tuple[int, int]]] = [[] for _ in range(q)]
    for r, a, e in zip(rows_s.tolist(), starts.tolist(), ends.tolist()):
        out[r].append((a, e - a))
    return out


class Trace:
    """Records steps, router choices and pipeline events; ``to_json(kind)`` gives each picture's data.

    Args:
        window: the window whose masks and cache the pictures show (default: the smallest window of the first
            plan, or None if no layer has one).
        windows: the window of each layer, for the receptive field (default: unknown; set by ``record_run``).
    """

    def __init__(self, window: Optional[int] = None, windows: Optional[Sequence[Optional[int]]] = None):
        self.window = window
        self._window_chosen = window is not None
        self.windows = list(windows) if windows is not None else None
        self.steps: list[StepRecord] = []
        self.pipeline: list[dict] = []
        self._slots: dict[Optional[int], dict[int, list[Optional[int]]]] = {}
        self._router: dict[int, tuple[list[list[int]], list[list[float]]]] = {}

    # -- hooks -----------------------------------------------------------------------------------------------
    def on_step(self, phase: str, plan: "BatchPlan", cache_positions: Optional[Mapping[int, int]] = None,
                tokens: Optional[Sequence[int] | torch.Tensor] = None, seqs: Optional[Sequence[int]] = None,
                prefill: str = "per_sequence", only: Optional[int] = None, mask: bool = True) -> None:
        """After a step's model call: record its masks, its cache writes and the router choices seen since the
        last step. ``cache_positions``: tokens each cache row holds after the step, ``{row: cached}`` (optional,
        kept as given). ``tokens``: the step's token ids (optional, for labels). ``seqs``: an id for each packed
        sequence that stays the same across steps (the engine's prompt index); default the cache rows (stable
        until the engine moves a row), or the packing order without a cache. ``prefill``: the pre-fill attention
        path the model's ops took ("per_sequence" or "dense"), which says which lowering of the mask ran.
        ``only``: record packed sequence ``only`` alone (its queries and keys, its cache row's writes, the trace's
        window; ``tokens`` and the router choices are then that sequence's own), its masks as runs; with ``mask``
        False, its cache writes and router choices alone (a step whose mask nobody will draw)."""
        if seqs is None:
            seqs = plan.rows if plan.rows is not None else range(len(plan.lengths))
        ids = [int(x) for x in seqs]
        if not self._window_chosen:
            ws = [w for w in plan.windows if w is not None]
            self.window = min(ws) if ws else None
            self._window_chosen = True
        masks, written = {}, {}
        ref = plan.windows[self.window] if self.window in plan.windows else next(iter(plan.windows.values()))
        if only is None:
            for w, wp in plan.windows.items():
                masks[w] = self._mask(wp, prefill, ids)
                written[w] = self._write(w, wp)
            slots = {w: {r: list(s) for r, s in rows.items()} for w, rows in self._slots.items()}
        else:
            row = None if ref.rows is None else ref.rows[only]
            if mask:
                masks[ref.window] = self._mask_of(ref, prefill, ids, only, row)
            written[ref.window] = self._write(ref.window, ref, row)
            held = self._slots.get(ref.window, {})
            slots = {ref.window: {row: list(held[row])}} if row in held else {}
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        self.steps.append(StepRecord(
            step=len(self.steps), kind=phase, phase=_phase(ref), starts=list(plan.starts),
            lengths=list(plan.lengths), rows=None if plan.rows is None else list(plan.rows), masks=masks,
            slots=slots, written=written,
            cached=None if cache_positions is None else {int(r): int(c) for r, c in dict(cache_positions).items()},
            router=self._router, token_ids=None if tokens is None else [int(t) for t in tokens]))
        self._router = {}

    def on_router(self, layer: int, chosen: torch.Tensor, weights: torch.Tensor) -> None:
        """In a MoE layer, after top-k: ``chosen`` (T, k) expert ids, ``weights`` (T, k) their softmax weights."""
        self._router[int(layer)] = (chosen.detach().cpu().tolist(), weights.detach().float().cpu().tolist())

    def on_pipeline_event(self, rank: int, kind: str, micro_batch: int, t_start: float, t_end: float) -> None:
        """A pipeline stage ran a forward ("F") or backward ("B") of one micro-batch from t_start to t_end (s)."""
        if kind not in ("F", "B"):
            raise ValueError(f"pipeline event kind must be 'F' or 'B', got {kind!r}")
        self.pipeline.append({"rank": int(rank), "kind": kind, "micro_batch": int(micro_batch),
                              "start": float(t_start), "end": float(t_end)})

    def on_row_move(self, src: int, dst: int) -> None:
        """The engine copied cache row ``src`` into ``dst`` (compaction after a sequence finished)."""
        for rows in self._slots.values():
            if src in rows:
                rows[dst] = list(rows[src])

    def on_row_restore(self, row: int, cached: int, sizes: Mapping[Optional[int], int]) -> None:
        """The engine gave cache row ``row`` a prompt's first ``cached`` positions from the prefix store
        (``generate.prefix``); ``sizes``: S of each window's rows (``RollingCache.cache_lens()``). Each window's slot
        map of the row becomes the one a pre-fill of them leaves, position p in slot ``p % S`` for the last S of
        them (a ring stored after a longer prompt holds later positions in some of those slots, which the plan
        reads as these: old positions, outside every later query's window). With S = 4 and cached = 6: slots
        0 1 2 3 hold 4 5 2 3."""
        for w, size in sizes.items():
            held: list[Optional[int]] = [None] * size
            for p in range(max(0, cached - size), cached):
                held[p % size] = p
            self._slots.setdefault(w, {})[row] = held

    # -- recording -------------------------------------------------------------------------------------------
    def _mask(self, wp: Any, prefill: str, ids: list[int]) -> MaskRecord:
        q_seq, q_pos = [ids[b] for b in wp.q_seq.tolist()], wp.q_pos.tolist()
        queries = list(zip(q_seq, q_pos))
        if wp.decode:
            # Keys: the first decode_len slots of each sequence's row, after this step's write; where the op reads
            # through maps (several queries per row, a ring larger than the window), every slot of the row, each
            # query's canonical entries placed at their slots.
            mapped = getattr(wp, "query_rows", None) is not None
            n = wp.cache_len if mapped else wp.decode_len
            keys: list[Key] = []
            for b, r in enumerate(wp.rows):
                held = self._slots_after_write(wp, r)
                keys += [(ids[b], held[s], s) for s in range(n)]
            valid = wp.decode_valid.cpu()
            read = wp.decode_slots.cpu() if mapped else None
            allowed = torch.zeros(len(queries), len(keys), dtype=torch.bool)
            for q, b in enumerate(wp.q_seq.tolist()):
                if read is None:
                    allowed[q, b * n:(b + 1) * n] = valid[q]
                else:
                    allowed[q, b * n + read[q][valid[q]]] = True
            return MaskRecord(wp.window, _phase(wp), queries, keys, allowed.int().tolist(),
                              "decode_slots" if mapped else "decode_valid", n)
        k_seq, k_pos = [ids[b] for b in wp.k_seq.tolist()], wp.k_pos.tolist()
        slots: list[Optional[int]] = [None] * len(k_seq)
        if wp.key_order is not None:                 # keys = cat([prefix, new])[key_order]
            n_prefix = len(wp.prefix_slot)
            prefix_slot = wp.prefix_slot.tolist()
            slots = [prefix_slot[i] if i < n_prefix else None for i in wp.key_order.tolist()]
        mask, how = _lowered_prefill(wp, prefill)
        if getattr(wp, "parts", None) is not None:
            # A mixed step: the one-token rows ran the decode op over their cache rows (same allowed pairs,
            # shown here in the pre-fill key layout), the others the pre-fill lowering.
            how = f"decode_valid + {how}"
        return MaskRecord(wp.window, _phase(wp), queries, list(zip(k_seq, k_pos, slots)), mask.int().tolist(), how)

    def _mask_of(self, wp: Any, prefill: str, ids: list[int], b: int, row: Optional[int]) -> MaskRecord:
        """Packed sequence b's part of ``_mask``: its queries, its keys, the runs of its lowered mask."""
        if wp.decode:
            assert row is not None, "a decode step reads a cache row"
            mapped = getattr(wp, "query_rows", None) is not None     # as ``_mask``: every slot of the row
            n = wp.cache_len if mapped else wp.decode_len
            held = self._slots_after_write(wp, row)
            keys: list[Key] = [(ids[b], held[s], s) for s in range(n)]
            q0 = sum(wp.q_seqlens[:b])                                # a draft's queries are its own
            q1 = q0 + wp.q_seqlens[b]
            queries = [(ids[b], p) for p in wp.q_pos[q0:q1].tolist()]
            allowed = wp.decode_valid[q0:q1].cpu().bool()
            if mapped:
                read, valid = wp.decode_slots[q0:q1].cpu(), allowed
                allowed = torch.zeros(q1 - q0, n, dtype=torch.bool)
                for j in range(q1 - q0):
                    allowed[j, read[j][valid[j]]] = True
            return MaskRecord(wp.window, _phase(wp), queries, keys, [], "decode_slots" if mapped else "decode_valid",
                              n, runs=runs(allowed))
        q0, k0 = sum(wp.q_seqlens[:b]), sum(wp.kv_seqlens[:b])
        q1, k1 = q0 + wp.q_seqlens[b], k0 + wp.kv_seqlens[b]
        queries = [(ids[b], p) for p in wp.q_pos[q0:q1].tolist()]
        k_pos = wp.k_pos[k0:k1].tolist()
        slots: list[Optional[int]] = [None] * len(k_pos)
        if wp.key_order is not None:
            n_prefix = len(wp.prefix_slot)
            order = wp.key_order[k0:k1]
            inside = order < n_prefix
            found = torch.full_like(order, -1)
            found[inside] = wp.prefix_slot[order[inside]]
            slots = [None if s < 0 else s for s in found.tolist()]
        how = "dense" if prefill == "dense" else "blocks"
        if getattr(wp, "parts", None) is not None:
            how = f"decode_valid + {how}"
        keys = [(ids[b], p, s) for p, s in zip(k_pos, slots)]
        mask = _lowered_prefill_of(wp, prefill, b)
        return MaskRecord(wp.window, _phase(wp), queries, keys, [], how, runs=runs(mask))

    def _writes(self, wp: Any, row: Optional[int] = None) -> list[tuple[int, int, int]]:
        """(row, slot, position) of the step's cache writes (of cache row ``row`` alone if given)."""
        if wp.cache_len is None:
            return []
        src, rows, slots = wp.write_src, wp.write_row, wp.write_slot
        if row is not None:
            keep = rows == row
            src, rows, slots = src[keep], rows[keep], slots[keep]
        pos = wp.q_pos[src].tolist()
        return list(zip(rows.tolist(), slots.tolist(), pos))

    def _slots_after_write(self, wp: Any, row: int) -> list[Optional[int]]:
        held = list(self._slots.get(wp.window, {}).get(row, [None] * wp.cache_len))
        for _, s, p in self._writes(wp, row):
            held[s] = p
        return held

    def _write(self, window: Optional[int], wp: Any, row: Optional[int] = None) -> list[tuple[int, int]]:
        """Apply the step's writes (to cache row ``row`` alone if given) to the slot map; return the (row, slot)
        pairs written."""
        writes = self._writes(wp, row)
        rows = self._slots.setdefault(window, {})
        for r, s, p in writes:
            rows.setdefault(r, [None] * wp.cache_len)[s] = p
        return [(r, s) for r, s, _ in writes]

    # -- output ----------------------------------------------------------------------------------------------
    def to_json(self, kind: str = "masks") -> dict:
        """The data of one picture: "masks", "cache", "moe" or "pipeline" (the receptive field is composed from
        the masks by ``analysis.receptive_field_from_trace``)."""
        if kind == "masks":
            return self._masks_json()
        if kind == "cache":
            return self._cache_json()
        if kind == "moe":
            return self._moe_json()
        if kind == "pipeline":
            return {"events": list(self.pipeline)}
        raise ValueError(f"unknown kind {kind!r}")

    def _masks_json(self) -> dict:
        steps = []
        for st in self.steps:
            m = st.masks[self.window] if self.window in st.masks else next(iter(st.masks.values()))
            steps.append({"step": st.step, "phase": st.phase, "kind": st.kind, "lowering": m.lowering,
                          "padding": m.padding, "starts": st.starts, "lengths": st.lengths,
                          "queries": [list(q) for q in m.queries], "keys": [list(k) for k in m.keys],
                          "allowed": m.allowed})
        return {"window": self.window, "steps": steps}

    def _cache_json(self) -> dict:
        steps = []
        size = None
        for st in self.steps:
            rows = st.slots.get(self.window, {})
            if not rows:
                continue
            n_rows = max(rows) + 1
            size = len(next(iter(rows.values())))
            grid = [rows.get(r, [None] * size) for r in range(n_rows)]
            # slots holding a position the row no longer has: the keys of rejected drafts, rolled back
            cached = st.cached or {}
            dropped = [[r, s] for r in range(n_rows) for s, p in enumerate(grid[r])
                       if p is not None and r in cached and p >= cached[r]]
            steps.append({"step": st.step, "phase": st.phase, "kind": st.kind, "rows": grid,
                          "written": [list(x) for x in st.written.get(self.window, [])], "cached": st.cached,
                          "rolled_back": dropped})
        return {"window": self.window, "slots": size, "steps": steps}

    def _moe_json(self) -> dict:
        tokens: list[list[int]] = []
        ids: list[Optional[int]] = []
        layers: dict[int, dict[str, Any]] = {}
        for st in self.steps:
            if not st.router:
                continue
            m = st.masks[self.window] if self.window in st.masks else next(iter(st.masks.values()))
            tokens += [list(q) for q in m.queries]
            ids += st.token_ids if st.token_ids is not None else [None] * len(m.queries)
            for layer, (chosen, weights) in st.router.items():
                d = layers.setdefault(layer, {"layer": layer, "experts": [], "weights": []})
                d["experts"] += chosen
                d["weights"] += weights
        return {"tokens": tokens, "ids": ids, "layers": [layers[k] for k in sorted(layers)]}
