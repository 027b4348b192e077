"""One request's steps as the server's inside panel draws them, recorded by a ``Trace`` restricted to its row.

The engine tells a request's ``RowObserver`` of each step that ran its row (``generate.engine.RowStep``: the
step's plan, the request's place in it, its MoE routing rows, the step's time and make-up). ``RowTrace`` feeds
those steps to the same ``Trace`` that ``sirocco viz`` fills (``on_step(..., only=index)``), so the slot map it
reports is the one ``sirocco viz cache --json`` records for the same tokens and window. Steps come in batches
(the server gathers those of a tenth of a second: a page redraws a few times a second, whatever the token rate),
and a batch becomes one JSON-ready event: each step's own facts, then the row as the last step left it:

    {"steps": [{"step": 7, "kind": "decode", "phase": "decode", "ms": 3.1, "rows": 2, "prefill_tokens": 0,
                "decode_tokens": 2, "row": 0, "start": 70, "cached": 71,
                "tokens": [[70, 1234, " the"]],                      # (position, id, text) of its tokens
                "moe": {"layers": [0, 1], "experts": [[[2, 0], [1, 3]]],   # per token, per layer: the k chosen
                        "weights": [[[0.61, 0.39], [0.55, 0.45]]]}}, ...],
     "window": 64, "slots": [64, 65, ..., 70, 7, ...],       # position held by each slot of the row
     "written": [6],                                           # slots the last step wrote
     "mask": {"phase": "decode", "lowering": "decode_valid", "padding": 64, "queries": [70],
              "keys": [[64, 0], [65, 1], ...],                 # (position, slot) of each key column
              "runs": [[[0, 64]]]}}                            # per query: (first key column, count) allowed

Only the batch's last step has its mask recorded (the one the panel draws). ``moe`` is absent for a model
without experts. A slot that holds nothing yet is ``null``; a key column read from the step's own tokens rather
than the cache has slot ``null``. The first step of a request whose row continued from the prefix store
(``generate.prefix``) also has ``cached_tokens`` (the m prompt tokens it did not pre-fill) and ``restored``:
(position, id, text) of those of them the slot map holds, which no step brought.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from ..generate.engine import RowStep
from .trace import Trace


class RowTrace:
    """Records one request's steps (a ``Trace`` restricted to its row, keeping its slot map and no history).

    ``token_text``: the text of a token id, for the events' ``tokens`` (default: none). A request's observer
    hands each ``RowStep`` on (the server gathers them on its event loop, off the engine's thread) and turns each
    batch into an event::

        class Observer:
            def __init__(self):
                self.rt, self.events = RowTrace(), []

            def on_row_step(self, step):
                self.events.append(self.rt.event([step]))

        engine.add_request(ids, params, observer=Observer())
    """

    def __init__(self, token_text: Optional[Callable[[int], str]] = None):
        self.trace = Trace()
        self.token_text = token_text
        self.row: Optional[int] = None
        self.steps = 0

    def event(self, steps: Sequence[RowStep]) -> dict:
        """Record a batch of consecutive steps (at least one) and return its event (see the module docstring)."""
        if not steps:
            raise ValueError("an event records at least one step")
        trace = self.trace
        out: list[dict] = []
        rec = None
        for i, st in enumerate(steps):
            if self.row is not None and st.row != self.row:      # compaction moved the row since the last step
                trace.on_row_move(self.row, st.row)
            self.row = st.row
            if st.restored:                                      # continued from the prefix store
                trace.on_row_restore(st.row, len(st.restored), {w: wp.cache_len for w, wp in st.plan.windows.items()
                                                                if wp.cache_len is not None})
            for layer, (chosen, weights) in st.routing.items():
                trace.on_router(layer, chosen, weights)
            trace.on_step(st.kind, st.plan, {st.row: st.cached}, st.tokens, seqs=[0] * len(st.plan.lengths),
                          prefill=st.prefill, only=st.index, mask=i == len(steps) - 1)
            rec = trace.steps.pop()                              # the slot map stays in the trace, the step goes
            out.append(self._step(st, rec))
        assert rec is not None and self.row is not None
        window = trace.window
        m = rec.masks[window]
        return {"steps": out, "window": window, "slots": rec.slots.get(window, {}).get(self.row),
                "written": [s for _, s in rec.written.get(window, [])],
                "mask": {"phase": m.phase, "lowering": m.lowering, "padding": m.padding,
                         "queries": [p for _, p in m.queries], "keys": [[p, s] for _, p, s in m.keys],
                         "runs": [[list(r) for r in q] for q in (m.runs or [])]}}

    def _step(self, st: RowStep, rec: Any) -> dict:
        tt = self.token_text
        step: dict[str, Any] = {
            "step": self.steps, "kind": st.kind, "phase": rec.phase, "ms": round(st.seconds * 1000, 3),
            "rows": st.rows, "prefill_tokens": st.prefill_tokens, "decode_tokens": st.decode_tokens,
            "row": st.row, "start": st.start, "cached": st.cached,
            "tokens": [[st.start + i, t, tt(t) if tt is not None else None] for i, t in enumerate(st.tokens)]}
        if st.drafted:
            step["proposed_tokens"] = st.drafted
            step["accepted_tokens"] = st.cached - st.start - 1
        if st.restored:
            # the prompt tokens the row was given before this step, and those of them the slot map holds
            held = rec.slots.get(self.trace.window, {}).get(st.row) or []
            step["cached_tokens"] = len(st.restored)
            step["restored"] = [[p, st.restored[p], tt(st.restored[p]) if tt is not None else None]
                                for p in sorted(p for p in held if p is not None and p < len(st.restored))]
        if rec.router:
            layers = sorted(rec.router)
            chosen = [rec.router[layer][0] for layer in layers]
            weights = [rec.router[layer][1] for layer in layers]
            step["moe"] = {"layers": layers,
                           "experts": [[c[i] for c in chosen] for i in range(len(st.tokens))],
                           "weights": [[[round(w, 3) for w in ws[i]] for ws in weights] for i in range(len(st.tokens))]}
        self.steps += 1
        return step
