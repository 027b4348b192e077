"""A stand-in for the engine's hooks: run prompts through the engine's schedule and call the trace.

``record_run`` follows ``generate.engine.Engine``'s schedule (all prompts admitted into rows 0..B-1; pre-fill
steps while any prompt has tokens outside the cache, each sequence bringing at most ``chunk_size`` tokens and
the step at most ``max_batch_tokens``; then decode steps; greedy sampling) and calls ``trace.on_step`` /
``trace.on_router`` where the engine and the model will once the hooks are wired. It is to be replaced by
``Engine(..., trace=trace)``; keep it small.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..cache import RollingCache
from .trace import Trace


def record_run(model, prompt_lengths: Sequence[int], window: Optional[int], chunk_size: int, max_tokens: int,
               trace: Trace, max_batch_tokens: Optional[int] = None, seed: int = 0,
               prompts: Optional[Sequence[Sequence[int]]] = None) -> list[list[int]]:
    """Generate ``max_tokens`` tokens for random prompts of these lengths (or the given ``prompts``).

    ``window``: the window whose masks and cache the trace shows (None: the model's smallest). Returns the
    generated ids per prompt.
    """
    args = model.args
    if window is not None:
        trace.window, trace._window_chosen = window, True
    trace.windows = args.windows()
    g = torch.Generator().manual_seed(seed)
    if prompts is None:
        prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in prompt_lengths]
    prompts = [list(map(int, p)) for p in prompts]
    budget_per_step = max_batch_tokens or 4 * chunk_size
    longest = max(len(p) for p in prompts) + max_tokens
    cache = RollingCache(args, rows=len(prompts), dtype=next(model.parameters()).dtype, device=model.device,
                         max_seq_len=min(args.max_seq_len, longest))
    cached = [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    moe_layers = [int(i) for i, layer in model.layers.items() if hasattr(layer.feed_forward, "gate")]
    with torch.inference_mode():
        while any(len(o) < max_tokens for o in out):
            left = [max(0, len(p) - c) for p, c in zip(prompts, cached)]
            if any(left):                                   # pre-fill step
                batch, lengths, budget = [], [], budget_per_step
                for b in range(len(prompts)):
                    n = min(left[b], chunk_size, budget)
                    if left[b] and n > 0:
                        batch.append(b)
                        lengths.append(n)
                        budget -= n
                toks = [t for b, n in zip(batch, lengths) for t in prompts[b][cached[b]:cached[b] + n]]
                kind = "prefill"
            else:                                           # decode step
                batch, lengths = list(range(len(prompts))), [1] * len(prompts)
                toks = [out[b][-1] for b in batch]
                kind = "decode"
            tokens = torch.tensor(toks, dtype=torch.long, device=model.device)
            plan = model.plan(lengths, starts=[cached[b] for b in batch], rows=batch, cache=cache)
            router: list[torch.Tensor] = []
            logits = model(tokens, plan, cache, router_logits=router if moe_layers else None)
            # Stand-in for the MoE hook: the layer's own top-k and softmax over its recorded logits.
            for layer, lg in zip(moe_layers, router):
                k = model.layers[str(layer)].feed_forward.k
                top, chosen = torch.topk(lg, k, dim=-1)
                trace.on_router(layer, chosen, torch.softmax(top.float(), dim=-1).to(lg.dtype))
            ends = torch.tensor(lengths).cumsum(0) - 1
            for i, (b, n) in enumerate(zip(batch, lengths)):
                cached[b] += n
                if cached[b] >= len(prompts[b]) and len(out[b]) < max_tokens:
                    out[b].append(int(logits[ends[i]].argmax()))
            trace.on_step(kind, plan, {b: cached[b] for b in batch}, tokens)
    return out
