"""What the recordings say: receptive fields (from the masks, and from gradients), MoE loads, MoE rebuilds.

Receptive field: the hidden state of token p after layer l depends on the layer l-1 states of the keys p's query
was allowed at layer l. Composing the recorded allowed sets layer by layer gives the positions it reaches; with
one window W for every layer that is ``[p - l (W - 1), p]``, but nothing here uses that formula. The same sets
come out of autograd: the rows of d(h_l[p]) / d(embeddings) that are not exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backends import reference
from ..config import ModelArgs
from ..model import Transformer
from ..model.transformer import MoeFeedForward
from .trace import Trace


def attended_sets(trace: Trace, window: int | None) -> dict[tuple[int, int], set[int]]:
    """``{(seq, pos): positions of the keys it was allowed}`` over every recorded step, for one window."""
    out: dict[tuple[int, int], set[int]] = {}
    for st in trace.steps:
        m = st.masks[window]
        for (seq, pos), row in zip(m.queries, m.allowed, strict=True):
            out[(seq, pos)] = {k[1] for k, a in zip(m.keys, row, strict=True) if a and k[1] is not None}
    return out


def receptive_field(trace: Trace, seq: int, pos: int, windows: Sequence[int | None] | None = None,
                    ) -> list[set[int]]:
    """Positions of sequence ``seq`` that token ``pos`` reaches after each layer, composed from the masks."""
    windows = list(windows if windows is not None else trace.windows or [])
    if not windows:
        raise ValueError("the layers' windows are unknown: pass windows=model.args.windows()")
    sets = {w: attended_sets(trace, w) for w in set(windows)}
    reach, out = {pos}, []
    for w in windows:
        reach = set().union(*(sets[w][(seq, p)] for p in reach))
        out.append(reach)
    return out


def receptive_field_from_trace(trace: Trace, token: tuple[int, int] | None = None,
                               windows: Sequence[int | None] | None = None) -> dict:
    """The receptive-field picture's data: ``{"window", "token", "reach": [[lowest, highest], per layer]}``."""
    if token is None:
        token = (0, max(p for s, p in attended_sets(trace, trace.window) if s == 0))
    seq, pos = token
    sets = receptive_field(trace, seq, pos, windows)
    return {"window": trace.window, "seq": seq, "token": pos, "reach": [[min(s), max(s)] for s in sets],
            "positions": [sorted(s) for s in sets]}


def gradient_receptive_field(model: Transformer, tokens: torch.Tensor, pos: int) -> list[set[int]]:
    """Positions whose input embedding has a non-zero gradient on the hidden state of ``pos`` after each layer.

    One forward without cache over one sequence (autograd on, the dense mask), hooks on the embedding and on
    every block's output; one backward per layer of a random projection of h_l[pos].
    """
    hidden: list[torch.Tensor] = []
    emb: list[torch.Tensor] = []

    def keep_emb(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        emb.append(out)

    assert model.tok_embeddings is not None, "a whole model, not a pipeline stage without the embedding"
    hooks = [model.tok_embeddings.register_forward_hook(keep_emb)]
    hooks += [layer.register_forward_hook(lambda _m, _i, out: hidden.append(out)) for layer in model.layers.values()]
    try:
        with torch.enable_grad():
            reference.attach(model, "dense")
            model(tokens, [len(tokens)])
            g = torch.Generator().manual_seed(0)
            out = []
            for h in hidden:
                proj = torch.randn(h.shape[-1], generator=g, dtype=h.dtype)
                (grad,) = torch.autograd.grad(h[pos] @ proj, emb[0], retain_graph=True)
                out.append(set(torch.nonzero(grad.abs().sum(-1)).flatten().tolist()))
    finally:
        reference.attach(model)
        for hk in hooks:
            hk.remove()
    return out


def expert_loads(moe: dict, num_experts: int | None = None) -> list[list[int]]:
    """Per layer, how many (token, choice) pairs went to each expert; each layer sums to k x tokens."""
    out = []
    for layer in moe["layers"]:
        flat = [e for choice in layer["experts"] for e in choice]
        n = num_experts or (max(flat) + 1 if flat else 0)
        out.append(torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=n).tolist())
    return out


def expert_persistence(moe: dict) -> list[float]:
    """Per layer, the share of consecutive tokens of one sequence whose first-choice expert is the same."""
    out = []
    for layer in moe["layers"]:
        first = {tuple(t): c[0] for t, c in zip(moe["tokens"], layer["experts"], strict=True)}
        pairs = [(first[(s, p)], first[(s, p + 1)]) for (s, p) in first if (s, p + 1) in first]
        out.append(sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan"))
    return out


def rebuild_moe(moe_layer: MoeFeedForward, x: torch.Tensor, chosen: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """A MoE feed-forward's output from the recorded routing: sum over the k choices of weight x expert(x).

    Expert by expert, each over its tokens in order, accumulated with ``index_add_`` as the layer does, so the
    result is bit-for-bit the layer's when the recording is the routing the layer used.
    """
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe_layer.experts):
        tok, choice = torch.nonzero(chosen == e, as_tuple=True)      # row-major: tokens in increasing order
        if len(tok):
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, choice][:, None].to(x.dtype))
    return out


def cache_bytes(args: ModelArgs, lengths: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> dict:
    """KV-cache bytes of one sequence at each length: the model's rolling cache against a full cache (the same
    model without a window), read from real ``RollingCache`` tensors (on the meta device: no memory)."""
    from ..cache import RollingCache

    full_args = args.replace(sliding_window=None)
    windows = [w for w in args.windows() if w is not None]
    return {"window": min(windows) if windows else None, "dtype": str(dtype).replace("torch.", ""),
            "lengths": list(lengths),
            "rolling": [RollingCache(args, 1, dtype, "meta", max_seq_len=n).nbytes() for n in lengths],
            "full": [RollingCache(full_args, 1, dtype, "meta", max_seq_len=n).nbytes() for n in lengths]}
