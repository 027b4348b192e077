"""PNG pictures (matplotlib, Agg backend, ~100 dpi) of the recorded data. One writer per kind:

    masks            every step a panel: queries x keys, allowed cells filled, prompt boundaries drawn
    receptive-field  layers x positions: what the hidden state of one token depends on after each layer
    cache            steps x slots with the position in each slot, this step's writes outlined, and the
                     unrotated (oldest first) order beside it
    moe              first-choice expert per token per layer; expert load per layer vs the even share;
                     share of consecutive tokens keeping their first expert vs chance
    pipeline         stages x time Gantt of F/B events per micro-batch, bubbles hatched, measured vs ideal share
    memory           KV-cache bytes vs sequence length, rolling vs full
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .analysis import expert_loads, expert_persistence

DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _boundaries(seqs: list[int]) -> list[int]:
    return [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1]]


def _lab(x: object) -> str:
    return "-" if x is None else str(x)


def masks(data: dict, path: str | Path) -> Path:
    steps = data["steps"]
    n = len(steps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, st in zip(axes.flat, steps, strict=False):
        allowed = st["allowed"]
        ax.imshow(allowed, cmap="Greens", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
        for b in _boundaries([k[0] for k in st["keys"]]):
            ax.axvline(b - 0.5, color="crimson", lw=1.2)
        for b in _boundaries([q[0] for q in st["queries"]]):
            ax.axhline(b - 0.5, color="crimson", lw=1.2)
        small = len(st["keys"]) <= 24
        ax.set_xticks(range(len(st["keys"])))
        ax.set_xticklabels([f"{k[1] if k[1] is not None else '∅'}" + (f"\n{_lab(k[2])}" if small else "")
                            for k in st["keys"]], fontsize=6)
        ax.set_yticks(range(len(st["queries"])))
        ax.set_yticklabels([f"s{s} p{p}" for s, p in st["queries"]], fontsize=6)
        title = f"step {st.get('step', '?')}: {st['phase']}"
        if st["phase"] == "decode" and st.get("kind") == "prefill":
            title += " (1-token chunk)"
        if st["phase"] == "decode":
            title += f" (rows padded to {st.get('padding')})"
        elif st["phase"] == "verify":
            title += " (a draft's queries; keys: its row's slots)"
        elif st["phase"] != "first chunk":
            title += " ([cache ; new] keys)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key position" + (" / cache slot" if small else ""), fontsize=7)
        ax.set_ylabel("query (sequence, position)", fontsize=7)
    fig.subplots_adjust(hspace=0.45, wspace=0.3)
    fig.suptitle(f"Attention masks as the plan lowered them, W = {data['window']} (red: prompt boundaries)",
                 fontsize=10)
    return _save(fig, path)


def receptive_field(data: dict, path: str | Path) -> Path:
    p = data["token"]
    reach = data.get("positions") or [list(range(lo, hi + 1)) for lo, hi in data["reach"]]
    grid = [[1 if i in set(r) else 0 for i in range(p + 1)] for r in reach]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * (p + 1) + 1.5), 0.45 * len(reach) + 1.5))
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.3, aspect="auto", interpolation="nearest")
    for layer, (lo, hi) in enumerate(data["reach"]):
        ax.text(p + 0.7, layer, f"{lo}..{hi}", va="center", fontsize=7)
    ax.set_yticks(range(len(reach)))
    ax.set_yticklabels([f"layer {i + 1}" for i in range(len(reach))], fontsize=7)
    ax.set_xticks(range(p + 1))
    ax.set_xticklabels([str(i) for i in range(p + 1)], fontsize=6)
    ax.set_xlabel("input position")
    ax.set_title(f"Positions the state of token {p} depends on, W = {data['window']}", fontsize=9)
    return _save(fig, path)


def cache(data: dict, path: str | Path) -> Path:
    S, steps = data["slots"], data["steps"]
    n_rows = max(len(s["rows"]) for s in steps)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.5 * S * n_rows + 1.5), 0.4 * len(steps) + 1.5), squeeze=False)
    for panel, ax in enumerate(axes[0]):
        ax.set_xlim(-0.5, S * n_rows - 0.5)
        ax.set_ylim(len(steps) - 0.5, -0.5)
        for t, st in enumerate(steps):
            written = {tuple(x) for x in st["written"]}
            dropped = {tuple(x) for x in st.get("rolled_back", [])}
            for r in range(n_rows):
                row = st["rows"][r] if r < len(st["rows"]) else [None] * S
                if panel == 0:
                    cells = list(enumerate(row))
                else:                               # unrotated: oldest first, the positions the row still has
                    cells = sorted(((s, p) for s, p in enumerate(row) if p is not None and (r, s) not in dropped),
                                   key=lambda c: c[1])
                for j, (s, p) in enumerate(cells):
                    x = r * S + j
                    new = (r, s) in written
                    if (r, s) in dropped:           # a rejected draft's key: the slot is kept, its position forgotten
                        ax.add_patch(Rectangle((x - 0.5, t - 0.5), 1, 1, facecolor="mistyrose", edgecolor="crimson",
                                               lw=1.2))
                        ax.plot([x - 0.4, x + 0.4], [t + 0.35, t - 0.35], color="crimson", lw=0.8)
                        ax.text(x, t, _lab(p), ha="center", va="center", fontsize=7, color="crimson",
                                fontweight="bold")
                        continue
                    ax.add_patch(Rectangle((x - 0.5, t - 0.5), 1, 1, facecolor="gold" if new else "whitesmoke",
                                           edgecolor="black" if new else "lightgray", lw=1.2 if new else 0.5))
                    ax.text(x, t, _lab(p), ha="center", va="center", fontsize=7)
        for r in range(1, n_rows):
            ax.axvline(r * S - 0.5, color="crimson", lw=1.2)
        ax.set_yticks(range(len(steps)))
        ax.set_yticklabels([f"{s['step']} {s['phase']}" for s in steps], fontsize=7)
        ax.set_xticks(range(S * n_rows))
        ax.set_xticklabels([str(i % S) for i in range(S * n_rows)] if panel == 0 else
                           [""] * (S * n_rows), fontsize=6)
        ax.set_xlabel("row | slot (= position mod S)" if panel == 0 else "row | oldest -> newest")
        ax.set_title("slots as stored" if panel == 0 else "unrotated", fontsize=9)
    fig.subplots_adjust(wspace=0.3)
    rolled = any(st.get("rolled_back") for st in steps)
    fig.suptitle(f"Rolling cache, W = {data['window']}, S = {S}: position held in each slot after each step "
                 f"(gold: written this step" + ("; red, struck: a rejected draft rolled back, its slot never read\n"
                                                "and overwritten later" if rolled else "") + ")", fontsize=9)
    return _save(fig, path)


def moe(data: dict, path: str | Path) -> Path:
    layers = data["layers"]
    loads = expert_loads(data)
    E = max(len(x) for x in loads)
    k = len(layers[0]["experts"][0]) if layers and layers[0]["experts"] else 1
    cmap = plt.get_cmap("tab10", max(E, 2))
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.4 * len(layers) + 2.5),
                             gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    ax = axes[0]
    grid = [[c[0] for c in layer["experts"]] for layer in layers]
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=E - 0.5, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"layer {l['layer']}" for l in layers], fontsize=7)
    text = data.get("text")
    if text and len(text) <= 64:                  # label the columns with the tokens' own text
        ax.set_xticks(range(len(text)))
        ax.set_xticklabels([repr(t)[1:-1] if t is not None else "?" for t in text], rotation=90, fontsize=6)
    ax.set_xlabel("token (processing order)")
    ax.set_title("first-choice expert", fontsize=9)
    ax.legend(handles=[Patch(color=cmap(e), label=f"expert {e}") for e in range(E)], fontsize=6, ncol=min(E, 8),
              loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax = axes[1]
    width = 0.8 / max(len(layers), 1)
    for i, (layer, load) in enumerate(zip(layers, loads, strict=True)):
        total = sum(load)
        ax.bar([e + i * width for e in range(len(load))], [n / total for n in load], width,
               label=f"layer {layer['layer']}")
    ax.axhline(1 / E, color="black", ls="--", lw=1, label="even share 1/E")
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_title(f"share of the {k} x tokens choices", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[2]
    keep = expert_persistence(data)
    chance = [sum((sum(1 for c in layer["experts"] if c[0] == e) / len(layer["experts"])) ** 2 for e in range(E))
              for layer in layers]
    x = range(len(layers))
    ax.bar([i - 0.2 for i in x], keep, 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], chance, 0.4, label="chance", color="lightgray")
    ax.set_xticks(list(x))
    ax.set_xticklabels([str(l["layer"]) for l in layers])
    ax.set_xlabel("layer")
    ax.set_title("consecutive tokens keeping their first expert", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, path)


def pipeline(data: dict, path: str | Path) -> Path:
    events = data["events"]
    ranks = sorted({e["rank"] for e in events})
    m = len({e["micro_batch"] for e in events})
    t0 = min(e["start"] for e in events)
    t1 = max(e["end"] for e in events)
    span = t1 - t0
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(ranks) + 1.8))
    cmap = plt.get_cmap("tab10")
    idle = 0.0
    for r in ranks:
        mine = sorted((e for e in events if e["rank"] == r), key=lambda e: e["start"])
        cursor = t0
        for e in mine:
            if e["start"] > cursor:
                ax.add_patch(Rectangle((cursor - t0, r - 0.4), e["start"] - cursor, 0.8, facecolor="none",
                                       hatch="///", edgecolor="lightgray", lw=0))
                idle += e["start"] - cursor
            light = e["kind"] == "B"
            ax.add_patch(Rectangle((e["start"] - t0, r - 0.4), e["end"] - e["start"], 0.8,
                                   facecolor=cmap(e["micro_batch"] % 10), alpha=0.55 if light else 1.0,
                                   edgecolor="black", lw=0.5))
            ax.text((e["start"] + e["end"]) / 2 - t0, r, f"{e['kind']}{e['micro_batch']}", ha="center",
                    va="center", fontsize=7)
            cursor = max(cursor, e["end"])
        if cursor < t1:
            ax.add_patch(Rectangle((cursor - t0, r - 0.4), t1 - cursor, 0.8, facecolor="none", hatch="///",
                                   edgecolor="lightgray", lw=0))
            idle += t1 - cursor
    p = len(ranks)
    measured = idle / (p * span) if span else 0.0
    ideal = (p - 1) / (m + p - 1)
    ax.set_xlim(0, span)
    ax.set_ylim(max(ranks) + 0.6, min(ranks) - 0.6)
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"stage {r}" for r in ranks])
    ax.set_xlabel("time (s)")
    note = data.get("note", "")
    ax.set_title(f"Pipeline, {p} stages x {m} micro-batches: bubble (hatched) {measured:.0%} measured, "
                 f"{ideal:.0%} ideal (p-1)/(m+p-1)" + (f"\n{note}" if note else ""), fontsize=9)
    return _save(fig, path)


def memory(data: dict, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    L = data["lengths"]
    ax.plot(L, [b / 2**20 for b in data["full"]], marker="o", label="full cache (no window)")
    ax.plot(L, [b / 2**20 for b in data["rolling"]], marker="o", label=f"rolling buffer, W = {data['window']}")
    if data.get("window"):
        ax.axvline(data["window"], color="gray", ls=":", lw=1)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("KV cache per sequence (MiB)")
    ax.set_title(f"KV cache of {data.get('model', 'the model')} ({data.get('dtype', '')}), "
                 f"from RollingCache tensors", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


WRITERS: dict[str, Callable[[dict, str | Path], Path]] = {
    "masks": masks, "receptive-field": receptive_field, "cache": cache, "moe": moe, "pipeline": pipeline,
    "memory": memory}


def write_png(kind: str, data: dict, path: str | Path) -> Path:
    """Write the PNG of one picture kind; returns its path."""
    if kind not in WRITERS:
        raise ValueError(f"no PNG writer for {kind!r}; known: {', '.join(WRITERS)}")
    return WRITERS[kind](data, path)
