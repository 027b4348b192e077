"""A stand-in for the engine's hooks: run prompts through the engine's schedule and call the trace.

``record_run`` follows ``generate.engine.Engine``'s schedule (all prompts admitted into rows 0..B-1; pre-fill
steps while any prompt has tokens outside the cache, each sequence bringing at most ``chunk_size`` tokens and
the step at most ``max_batch_tokens``; then decode steps; greedy sampling) and calls ``trace.on_step`` /
``trace.on_router`` where the engine and the model will once the hooks are wired. It is to be replaced by
``Engine(..., trace=trace)``; keep it small.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..cache import RollingCache
from .trace import Trace


def record_run(model, prompt_lengths: Sequence[int], window: Optional[int], chunk_size: int, max_tokens: int,
               trace: Trace, max_batch_tokens: Optional[int] = None, seed: int = 0,
               prompts: Optional[Sequence[Sequence[int]]] = None, backend: str = "per_sequence",
               cache: Optional[RollingCache] = None) -> list[list[int]]:
    """Generate ``max_tokens`` tokens for random prompts of these lengths (or the given ``prompts``).

    ``window``: the window whose masks and cache the trace shows (None: the model's smallest). ``backend``:
    the pre-fill attention path. ``cache``: the cache to fill (default a new one, just big enough). Returns the
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
    if cache is None:
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
            plan = model.plan(lengths, starts=[cached[b] for b in batch], rows=batch, cache=cache, backend=backend)
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
            trace.on_step(kind, plan, {b: cached[b] for b in batch}, tokens, seqs=batch)
    return out


def record_pipeline(args, stages: int, micro_batches: int, tokens: int, trace: Trace, seed: int = 0,
                    repeats: int = 3) -> None:
    """Pipeline events for a GPipe schedule (all forwards, then all backwards) of a tiny model cut in stages.

    In one process the stages cannot overlap, so each stage's forward and backward of each micro-batch is run
    and timed for real, and the events are then placed by GPipe's dependencies (a stage starts a micro-batch
    when it is free and the previous stage has handed it over). To be replaced by the pipeline schedule's hook.
    """
    from ..model import build_model

    if args.n_layers < stages:
        args = args.replace(n_layers=stages)
    cuts = [round(i * args.n_layers / stages) for i in range(stages + 1)]
    mods = [build_model(args, seed=seed, layers=list(range(cuts[i], cuts[i + 1])), embed=i == 0,
                        head=i == stages - 1) for i in range(stages)]
    g = torch.Generator().manual_seed(seed)
    f = [[float("inf")] * micro_batches for _ in mods]
    b = [[float("inf")] * micro_batches for _ in mods]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # a busy second core stalls two-thread ops of tiny tensors
    try:
        for _ in range(repeats):       # the fastest of a few runs: the host's hiccups are not the schedule's
            for i in [-1] + list(range(micro_batches)):       # -1: an untimed warm-up (first backward is slow)
                x, acts = torch.randint(0, args.vocab_size, (tokens,), generator=g), []
                for s, mod in enumerate(mods):
                    inp = x if s == 0 else x.detach().requires_grad_()
                    t = time.perf_counter()
                    out = mod(inp, [tokens])
                    if i >= 0:
                        f[s][i] = min(f[s][i], time.perf_counter() - t)
                    acts.append((inp, out))
                    x = out
                grad = torch.randn(out.shape, generator=g)
                for s in reversed(range(stages)):
                    inp, out = acts[s]
                    t = time.perf_counter()
                    out.backward(grad)
                    if i >= 0:
                        b[s][i] = min(b[s][i], time.perf_counter() - t)
                    grad = inp.grad
    finally:
        torch.set_num_threads(threads)
    free = [0.0] * stages
    f_end = [[0.0] * micro_batches for _ in mods]
    for i in range(micro_batches):
        for s in range(stages):
            t0 = max(free[s], f_end[s - 1][i] if s else 0.0)
            f_end[s][i] = free[s] = t0 + f[s][i]
            trace.on_pipeline_event(s, "F", i, t0, f_end[s][i])
    b_end = [[0.0] * micro_batches for _ in mods]
    for i in range(micro_batches):
        for s in reversed(range(stages)):
            ready = b_end[s + 1][i] if s < stages - 1 else max(f_end[s])
            t0 = max(free[s], ready)
            b_end[s][i] = free[s] = t0 + b[s][i]
            trace.on_pipeline_event(s, "B", i, t0, b_end[s][i])
