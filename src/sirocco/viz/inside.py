"""One request's steps as the server's inside panel draws them, recorded by a ``Trace`` restricted to its row.

The engine tells a request's ``RowObserver`` of each step that ran its row (``generate.engine.RowStep``: the
step's plan, the request's place in it, its MoE routing rows, the step's time and make-up). ``RowTrace`` feeds
that to the same ``Trace`` that ``sirocco viz`` fills (``on_step(..., only=index)``), so the slot map it reports
is the one ``sirocco viz cache --json`` records for the same tokens and window, and turns each step into one
JSON-ready event:

    {"step": 7, "kind": "decode", "phase": "decode", "ms": 3.1, "rows": 2, "prefill_tokens": 0,
     "decode_tokens": 2, "row": 0, "start": 70, "cached": 71, "tokens": [[70, 1234, " the"]],
     "window": 64, "slots": [64, 65, ..., 70, 7, ...],       # position held by each slot of the row
     "written": [6],                                           # slots written by this step
     "mask": {"phase": "decode", "lowering": "decode_valid", "queries": [70],
              "keys": [[64, 0], [65, 1], ...],                 # (position, slot) of each key column
              "runs": [[[0, 64]]]},                            # per query: (first key column, count) allowed
     "moe": {"positions": [70], "layers": [{"layer": 0, "experts": [[2, 0]], "weights": [[0.61, 0.39]]}]}}

``moe`` is absent for a model without experts. A slot that holds nothing yet is ``null``; a key column read
from the step's own tokens rather than the cache has slot ``null``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..generate.engine import RowStep
from .trace import Trace


class RowTrace:
    """Records one request's steps (a ``Trace`` restricted to its row, keeping its slot map and no history).

    ``token_text``: the text of a token id, for the events' ``tokens`` (default: none). A request's observer
    calls ``event`` with each ``RowStep`` (the server does it on its event loop, off the engine's thread)::

        class Observer:
            def __init__(self):
                self.rt, self.events = RowTrace(), []

            def on_row_step(self, step):
                self.events.append(self.rt.event(step))

        engine.add_request(ids, params, observer=Observer())
    """

    def __init__(self, token_text: Optional[Callable[[int], str]] = None):
        self.trace = Trace()
        self.token_text = token_text
        self.row: Optional[int] = None
        self.steps = 0

    def event(self, st: RowStep) -> dict:
        """Record one step and return its event (see the module docstring)."""
        trace = self.trace
        if self.row is not None and st.row != self.row:          # compaction moved the row since the last step
            trace.on_row_move(self.row, st.row)
        self.row = st.row
        for layer, (chosen, weights) in st.routing.items():
            trace.on_router(layer, chosen, weights)
        trace.on_step(st.kind, st.plan, {st.row: st.cached}, st.tokens, seqs=[0] * len(st.plan.lengths),
                      prefill=st.prefill, only=st.index)
        rec = trace.steps.pop()                                  # the slot map stays in the trace, the step goes
        window = trace.window
        mask = rec.masks[window]
        slots = rec.slots.get(window, {}).get(st.row)
        tt = self.token_text
        out: dict[str, Any] = {
            "step": self.steps, "kind": st.kind, "phase": rec.phase, "ms": round(st.seconds * 1000, 3),
            "rows": st.rows, "prefill_tokens": st.prefill_tokens, "decode_tokens": st.decode_tokens,
            "row": st.row, "start": st.start, "cached": st.cached,
            "tokens": [[st.start + i, t, tt(t) if tt is not None else None] for i, t in enumerate(st.tokens)],
            "window": window, "slots": slots, "written": [s for _, s in rec.written.get(window, [])],
            "mask": {"phase": mask.phase, "lowering": mask.lowering, "padding": mask.padding,
                     "queries": [p for _, p in mask.queries], "keys": [[p, s] for _, p, s in mask.keys],
                     "runs": [[list(r) for r in q] for q in (mask.runs or [])]},
        }
        if rec.router:
            out["moe"] = {"positions": [st.start + i for i in range(len(st.tokens))],
                          "layers": [{"layer": layer, "experts": chosen,
                                      "weights": [[round(w, 3) for w in ws] for ws in weights]}
                                     for layer, (chosen, weights) in sorted(rec.router.items())]}
        self.steps += 1
        return out
