"""Character-grid renderings of the recorded data, for a terminal or a log.

Masks, one grid per step: rows are queries (``s<seq> p<pos>``), columns keys with three header lines
(sequence, position, cache slot; ``-`` for a key not read from the cache, or an empty slot), ``■`` where the
query may attend, ``·`` where it may not, ``│`` and ``─`` at sequence boundaries::

    step 0 · first chunk · W=3 · lowered from blocks
            seq  0 0 0 │ 1 1
            pos  0 1 2 │ 0 1
           slot  - - - │ - -
     s0 p0 │     ■ · · │ · ·
    ...

Colour (ANSI) only when the stream is a terminal and NO_COLOR is unset. ``parse_grid`` reads a rendered grid
back to booleans.
"""

from __future__ import annotations

import os
import re
import sys
from typing import IO

from .analysis import expert_loads, expert_persistence

YES, NO = "■", "·"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROW = re.compile(r"^\s*s\d+ p\d+ │(.*)$")


def use_colour(stream: IO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour else text


def _label(x: object) -> str:
    return "-" if x is None else str(x)


# -- masks ---------------------------------------------------------------------------------------------------
def render_mask_step(step: dict, window: int | None, colour: bool = False) -> str:
    keys, queries = step["keys"], step["queries"]
    w = max([len(_label(v)) for k in keys for v in k] + [1])
    qlabels = [f"s{s} p{p}" for s, p in queries]
    L = max([len(x) for x in qlabels] + [5])

    def cells(values: list[str], seqs: list[int]) -> str:
        """Cells (already padded to the column width) with a bar between sequences."""
        out = []
        for i, (v, s) in enumerate(zip(values, seqs, strict=True)):
            if i and s != seqs[i - 1]:
                out.append("│")
            out.append(v)
        return " ".join(out)

    kseq = [k[0] for k in keys]
    head = f"step {step.get('step', '?')} · {step['phase']} · W={window}"
    if step.get("kind") == "prefill" and step["phase"] == "decode":
        head += " (a pre-fill chunk of one token per sequence runs as a decode step)"
    if step.get("lowering"):
        head += f" · lowered from {step['lowering']}"
    if step.get("padding") is not None:
        head += f" · {step['padding']} slots read per row"
    lines = [head]
    for name, idx in (("seq", 0), ("pos", 1), ("slot", 2)):
        lines.append(f"{name:>{L}}   " + cells([f"{_label(k[idx]):>{w}}" for k in keys], kseq))
    for i, (lab, row) in enumerate(zip(qlabels, step["allowed"], strict=True)):
        if i and queries[i][0] != queries[i - 1][0]:
            rule = cells(["─" * w] * len(keys), kseq).replace(" ", "─").replace("│", "┼")
            lines.append("─" * (L + 1) + "┼─" + rule)
        marks = [_paint(f"{YES:>{w}}", "32", colour) if a else _paint(f"{NO:>{w}}", "2", colour) for a in row]
        lines.append(f"{lab:>{L}} │ " + cells(marks, kseq))
    return "\n".join(lines)


def render_masks(data: dict, colour: bool = False) -> str:
    return "\n\n".join(render_mask_step(s, data["window"], colour) for s in data["steps"])


def parse_grid(text: str) -> list[list[bool]]:
    """The allowed matrix of one rendered mask grid (its query rows, in order)."""
    rows = []
    for line in _ANSI.sub("", text).splitlines():
        m = _ROW.match(line)
        if m:
            rows.append([c == YES for c in m.group(1) if c in (YES, NO)])
    return rows


def parse_grids(text: str) -> list[list[list[bool]]]:
    """Every grid of a ``render_masks`` text, one per step."""
    blocks = re.split(r"\n(?=step )", _ANSI.sub("", text))
    return [parse_grid(b) for b in blocks if b.startswith("step ")]


# -- cache ---------------------------------------------------------------------------------------------------
def render_cache(data: dict, colour: bool = False) -> str:
    """Steps down, slots across, one block per row; ``*`` marks this step's writes, ``x`` the slots of rejected
    drafts (rolled back: the row no longer has that position), then the row's positions unrotated (oldest
    first)."""
    S = data["slots"]
    steps = data["steps"]
    n_rows = max((len(s["rows"]) for s in steps), default=0)
    w = max([len(_label(p)) for s in steps for r in s["rows"] for p in r] + [1]) + 1
    lines = [f"cache · W={data['window']} · {S} slots per row, slot = position mod {S} · * written this step · "
             + ("x rolled back (a rejected draft) · " if any(st.get("rolled_back") for st in steps) else "")
             + "then the row unrotated, oldest first"]
    head = f"{'step':>4} {'phase':<12}"
    for r in range(n_rows):
        head += " │ " + f"row {r}".ljust(2 * S * w + 3)
    lines.append(head.rstrip())
    lines.append(f"{'':>4} {'':<12}" + "".join(" │ " + "".join(f"{s:>{w}}" for s in range(S)) + " → " +
                                               " " * (S * w) for _ in range(n_rows)))
    for st in steps:
        written = {tuple(x) for x in st["written"]}
        dropped = {tuple(x) for x in st.get("rolled_back", [])}
        line = f"{st['step']:>4} {st['phase']:<12}"
        for r in range(n_rows):
            row = st["rows"][r] if r < len(st["rows"]) else [None] * S
            cells = []
            for s, p in enumerate(row):
                if (r, s) in dropped:
                    cells.append(_paint(f"{_label(p) + 'x':>{w}}", "31", colour))
                    continue
                c = _label(p) + ("*" if (r, s) in written else " ")
                cells.append(_paint(f"{c:>{w}}", "1;33", colour) if (r, s) in written else f"{c:>{w}}")
            order = sorted(p for s, p in enumerate(row) if p is not None and (r, s) not in dropped)
            line += " │ " + "".join(cells) + " → " + "".join(f"{p:>{w}}" for p in order).ljust(S * w)
        lines.append(line.rstrip())
    return "\n".join(lines)


# -- receptive field -----------------------------------------------------------------------------------------
def render_receptive_field(data: dict, colour: bool = False) -> str:
    p = data["token"]
    reach = data.get("positions") or [list(range(lo, hi + 1)) for lo, hi in data["reach"]]
    w = len(str(p))
    lines = [f"receptive field of position {p} (sequence {data.get('seq', 0)}) · W={data['window']} · "
             f"{YES} = the hidden state after the layer depends on that position"]
    lines.append(f"{'position':>9} " + " ".join(f"{i:>{w}}" for i in range(p + 1)))
    for layer, pos in enumerate(reach, 1):
        s = set(pos)
        marks = [_paint(YES, "36", colour) if i in s else NO for i in range(p + 1)]
        lines.append(f"{'layer ' + str(layer):>9} " + " ".join(" " * (w - 1) + m for m in marks)
                     + f"   {min(s)}..{max(s)}")
    return "\n".join(lines)


# -- moe -----------------------------------------------------------------------------------------------------
_EXPERT_COLOURS = ["41", "42", "43", "44", "45", "46", "47", "100"]


def render_moe(data: dict, colour: bool = False) -> str:
    """First-choice expert of each token (columns) at each layer (rows), then loads and persistence."""
    tokens = data["tokens"]
    lines = [f"moe · first-choice expert per token · {len(tokens)} tokens in processing order"]
    lab = " ".join(f"s{s}p{p}" for s, p in tokens)
    w = max([len(f"s{s}p{p}") for s, p in tokens] + [1])
    lines.append(f"{'token':>8} " + " ".join(f"{f's{s}p{p}':>{w}}" for s, p in tokens) if len(lab) < 400 else
                 f"{'token':>8} (labels omitted)")
    for layer in data["layers"]:
        cells = []
        for choice in layer["experts"]:
            e = str(choice[0])
            cells.append(_paint(f"{e:>{w}}", _EXPERT_COLOURS[choice[0] % 8], colour))
        lines.append(f"{'layer ' + str(layer['layer']):>8} " + " ".join(cells))
    loads = expert_loads(data)
    keep = expert_persistence(data)
    for layer, load, k in zip(data["layers"], loads, keep, strict=True):
        total = sum(load)
        share = " ".join(f"e{e} {n / total:.2f}" for e, n in enumerate(load))
        lines.append(f"layer {layer['layer']}: share {share} (even {1 / len(load):.2f}); "
                     f"consecutive tokens keeping their first expert {k:.2f}")
    return "\n".join(lines)


# -- pipeline, memory ----------------------------------------------------------------------------------------
def render_pipeline(data: dict, colour: bool = False, columns: int = 96) -> str:
    """Stages down, time across (``columns`` characters): ``F333``/``B333``: forward/backward of micro-batch 3,
    ``░`` is the bubble."""
    ev = data["events"]
    t0, t1 = min(e["start"] for e in ev), max(e["end"] for e in ev)
    dt = (t1 - t0) / columns or 1.0
    ranks = sorted({e["rank"] for e in ev})
    m = len({e["micro_batch"] for e in ev})
    lines = [f"pipeline · {len(ranks)} stages x {m} micro-batches · time across, {dt * 1e3:.2f} ms per column"]
    busy = 0.0
    for r in ranks:
        row = ["░"] * columns
        for e in ev:
            if e["rank"] != r:
                continue
            busy += e["end"] - e["start"]
            a, b = int((e["start"] - t0) / dt), max(int((e["start"] - t0) / dt) + 1, int((e["end"] - t0) / dt))
            for c in range(a, min(b, columns)):
                row[c] = e["kind"] if c == a else str(e["micro_batch"] % 10)
        lines.append(f"stage {r} │" + "".join(row) + "│")
    p = len(ranks)
    lines.append(f"bubble: {1 - busy / (p * (t1 - t0)):.0%} measured, {(p - 1) / (m + p - 1):.0%} ideal "
                 f"(p-1)/(m+p-1)" + (f" · {data['note']}" if data.get("note") else ""))
    return "\n".join(lines)


def render_memory(data: dict, colour: bool = False) -> str:
    lines = [f"KV cache per sequence ({data.get('model', '')} {data['dtype']}), rolling W={data['window']} vs full",
             f"{'tokens':>8} {'rolling MiB':>12} {'full MiB':>10}"]
    for n, a, b in zip(data["lengths"], data["rolling"], data["full"], strict=True):
        lines.append(f"{n:>8} {a / 2**20:>12.1f} {b / 2**20:>10.1f}")
    return "\n".join(lines)


RENDERERS = {"masks": render_masks, "cache": render_cache, "receptive-field": render_receptive_field,
             "moe": render_moe, "pipeline": render_pipeline, "memory": render_memory}


def render(kind: str, data: dict, colour: bool | None = None, stream: IO | None = None) -> str:
    """The terminal text of one picture; ``colour`` None: decide from ``stream`` (default stdout)."""
    if kind not in RENDERERS:
        raise ValueError(f"no terminal rendering for {kind!r}; known: {', '.join(RENDERERS)}")
    return RENDERERS[kind](data, use_colour(stream) if colour is None else colour)
