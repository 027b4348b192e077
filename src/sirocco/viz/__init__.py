"""Pictures of what sirocco does, recorded from real runs: one function per kind, each returning
``(data, terminal_text)``; ``write_png(kind, data, path)`` draws the data. A ``sirocco viz KIND`` verb is meant
to be a thin wrapper over these.

    masks            attention masks of every step (first chunk, later chunks, decode) as the plan lowered them
    cache            the rolling cache's slot -> position map after every step
    receptive-field  positions one token depends on after each layer, composed from the recorded masks
    moe              router choices per token per layer, expert loads, persistence
    pipeline         F/B events of a pipeline schedule per stage and micro-batch, with the bubble
    memory           KV-cache bytes against sequence length, rolling vs full

Runs use a tiny random model unless ``model`` is given (any ``Transformer``; its windows decide the masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs
from ..generate.speculation import ROW_EXACT_TOKENS, Speculation
from ..model import Transformer
from . import analysis, terminal
from .run import record_pipeline, record_run
from .trace import Trace

__all__ = [
    "KINDS",
    "Trace",
    "cache",
    "masks",
    "memory",
    "moe",
    "pipeline",
    "receptive_field",
    "record_pipeline",
    "record_run",
    "render",
    "write_png",
]

KINDS = ("masks", "cache", "receptive-field", "moe", "pipeline", "memory")


def write_png(kind: str, data: dict, path: str | Path) -> Path:
    """Write one picture's data as a PNG (matplotlib is imported here, not when the engine imports the trace)."""
    from .png import write_png as write
    return write(kind, data, path)


def render(kind: str, data: dict, colour: bool | None = None) -> str:
    return terminal.render(kind, data, colour)


def _tiny(window: int | None, n_layers: int = 2, moe: bool = False, seed: int = 0) -> Transformer:
    from ..config import preset
    from ..model import build_model

    args = preset("tiny-moe" if moe else "tiny", sliding_window=window, n_layers=n_layers)
    return build_model(args, seed=seed)


def _run(model: Transformer, prompts: Prompts, window: int | None, chunk_size: int | None, max_tokens: int,
         max_batch_tokens: int | None, seed: int, draft_tokens: int = 0) -> Trace:
    """A traced run of prompts given as token lengths (random tokens) or as token ids. ``draft_tokens``: speculate,
    drafting the run's own greedy continuation (from a plain run first) with about one draft token in two wrong,
    so that drafts are accepted and rejected, on a ring of W + draft_tokens slots."""
    if chunk_size is None:            # the engine's default: the model's smallest window
        ws = [w for w in model.args.windows() if w is not None]
        chunk_size = min(ws) if ws else 4096
    trace = Trace()
    given: list[Any] = list(prompts)
    ids = [[int(t) for t in p] for p in given] if given and not isinstance(given[0], int) else None
    lengths = [len(p) for p in ids] if ids is not None else [int(n) for n in given]
    speculation = None
    if draft_tokens:
        from ..generate.drafters import KnownDrafter

        if ids is None:
            g = torch.Generator().manual_seed(seed)
            ids = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]
        plain, _ = record_run(model, lengths, window, chunk_size, max_tokens, Trace(),
                              max_batch_tokens=max_batch_tokens, seed=seed, prompts=ids)
        drafter = KnownDrafter({tuple(p): c for p, c in zip(ids, plain, strict=True)}, model.args.vocab_size, p=0.6,
                               seed=seed)
        speculation = Speculation(drafter=drafter, draft_tokens=draft_tokens, cost_curve=[1.0] * ROW_EXACT_TOKENS)
    record_run(model, lengths, window, chunk_size, max_tokens, trace, max_batch_tokens=max_batch_tokens, seed=seed,
               prompts=ids, speculation=speculation)
    return trace


Prompts = Sequence[int] | Sequence[Sequence[int]]      # token lengths (random tokens), or token ids


def masks(prompts: Prompts = (7, 5, 6), window: int | None = 3, chunk_size: int | None = None,
          max_tokens: int = 2, max_batch_tokens: int | None = None, model: Transformer | None = None, seed: int = 0,
          colour: bool | None = None, draft_tokens: int = 0) -> tuple[dict, str]:
    """Masks of a run of prompts (token lengths, or token ids): chunked pre-fill (``chunk_size`` default W) then
    decode; with ``draft_tokens``, speculative (see ``_run``): verify steps, each draft query masked to its own
    window."""
    model = model or _tiny(window, seed=seed)
    data = _run(model, prompts, window, chunk_size, max_tokens, max_batch_tokens, seed,
                draft_tokens=draft_tokens).to_json("masks")
    return data, render("masks", data, colour)


def cache(prompts: Prompts = (6,), window: int | None = 4, chunk_size: int | None = None,
          max_tokens: int = 4, max_batch_tokens: int | None = None, model: Transformer | None = None, seed: int = 0,
          colour: bool | None = None, draft_tokens: int = 0) -> tuple[dict, str]:
    """The rolling cache's slots after every step of a run. ``draft_tokens``: a speculative run (see ``_run``):
    the ring has W + draft_tokens slots, and the slots of rejected drafts are marked rolled back."""
    model = model or _tiny(window, seed=seed)
    data = _run(model, prompts, window, chunk_size, max_tokens, max_batch_tokens, seed,
                draft_tokens=draft_tokens).to_json("cache")
    return data, render("cache", data, colour)


def receptive_field(length: int = 6, window: int | None = 3, n_layers: int = 5, chunk_size: int | None = None,
                    model: Transformer | None = None, seed: int = 0, colour: bool | None = None,
                    token: int | None = None) -> tuple[dict, str]:
    """What token ``token`` (default the last) of one prompt depends on after each layer, composed from the run's
    recorded masks; ``data["gradient"]`` holds the same sets read from autograd (a forward without cache)."""
    token = length - 1 if token is None else token
    if not 0 <= token < length:
        raise ValueError(f"token {token} is outside the prompt of {length} tokens")
    model = model or _tiny(window, n_layers=n_layers, seed=seed)
    trace = _run(model, [length], window, chunk_size, 1, None, seed)
    data = analysis.receptive_field_from_trace(trace, token=(0, token), windows=model.args.windows())
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.args.vocab_size, (length,), generator=g)
    data["gradient"] = [sorted(s) for s in analysis.gradient_receptive_field(model, tokens, token)]
    return data, render("receptive-field", data, colour)


def moe(prompts: Prompts = (12, 9), max_tokens: int = 4, chunk_size: int | None = 8, model: Transformer | None = None,
        seed: int = 0, colour: bool | None = None) -> tuple[dict, str]:
    """Router choices of every token at every MoE layer over a run (tiny Mixtral-style model by default)."""
    model = model or _tiny(None, moe=True, seed=seed)
    data = _run(model, prompts, None, chunk_size, max_tokens, None, seed).to_json("moe")
    data["loads"] = analysis.expert_loads(data, getattr(model.args.moe, "num_experts", None))
    data["persistence"] = analysis.expert_persistence(data)
    return data, render("moe", data, colour)


def pipeline(stages: int = 2, micro_batches: int = 4, tokens: int = 64, seed: int = 0, schedule: str = "gpipe",
             colour: bool | None = None) -> tuple[dict, str]:
    """A real pipeline training step of a tiny model over ``stages`` processes: each stage's forward and backward
    of each micro-batch, as the schedule ran them."""
    from ..config import preset

    trace = Trace()
    record_pipeline(preset("tiny", n_layers=2 * stages), stages, micro_batches, tokens, trace, seed=seed,
                    schedule=schedule)
    data = trace.to_json("pipeline")
    data.update(schedule=schedule, stages=stages, micro_batches=micro_batches,
                ideal_bubble=(stages - 1) / (micro_batches + stages - 1))
    data["note"] = f"{schedule}, one real training step, {stages} processes on this machine"
    return data, render("pipeline", data, colour)


def memory(model: str | ModelArgs = "mistral-7b-v0.1", lengths: Sequence[int] | None = None,
           dtype: torch.dtype = torch.bfloat16, colour: bool | None = None) -> tuple[dict, str]:
    """KV-cache bytes per sequence against the sequence length, rolling vs full: of a preset's name, or of a
    ``ModelArgs``."""
    from ..config import preset

    args = preset(model) if isinstance(model, str) else model
    model = model if isinstance(model, str) else "the model"
    lengths = lengths or [2 ** i for i in range(9, 16) if 2 ** i <= args.max_seq_len]
    data = analysis.cache_bytes(args, lengths, dtype)
    data["model"] = model
    return data, render("memory", data, colour)
