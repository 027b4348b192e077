"""The loss curve of a run, as a PNG next to its checkpoint (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def plot_losses(train: list[list[float]], val: list[list[float]], out: str | Path, title: str = "",
                baseline: float | None = None) -> Path:
    """Training loss per step (and its moving average), validation loss per evaluation; ``[step, loss]`` pairs.

    ``baseline``: a horizontal reference line (the corpus's unigram entropy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {k})")
    if val:
        vs, vl = zip(*[(s, v) for s, v in val if not math.isnan(v)], strict=True) \
            if any(not math.isnan(v) for _, v in val) \
            else ((), ())
        ax.plot(vs, vl, "o-", color="tab:orange", markersize=3, label="validation")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
