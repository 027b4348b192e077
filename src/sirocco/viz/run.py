"""Runs that fill a trace: prompts through the real engine (``record_run``), and pipeline stage events
(``record_pipeline``)."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..cache import RollingCache
from ..generate.engine import Engine
from ..generate.sampling import SamplingParams
from .trace import Trace


def record_run(model, prompt_lengths: Sequence[int], window: Optional[int], chunk_size: int, max_tokens: int,
               trace: Trace, max_batch_tokens: Optional[int] = None, seed: int = 0,
               prompts: Optional[Sequence[Sequence[int]]] = None, attention: str = "per_sequence",
               max_seq_len: Optional[int] = None, mixed: bool = False) -> tuple[list[list[int]], RollingCache]:
    """Generate ``max_tokens`` greedy tokens for random prompts of these lengths (or the given ``prompts``) with
    ``Engine(..., trace=trace)``, every prompt in its own cache row.

    ``window``: the window whose masks and cache the trace shows (None: the model's smallest). ``attention``:
    the pre-fill attention path. ``max_seq_len``: sizes the cache (default: just big enough). ``mixed``: the
    engine's mixed steps; off by default so that the pictures show the textbook schedule (all pre-fill, then
    decode) and prompt i keeps row i to the end (with mixed steps a short prompt can finish while others are
    still pre-filling, and its row is then taken by another). Returns the generated ids per prompt and the
    cache the run filled.
    """
    args = model.args
    if window is not None:
        trace.window, trace._window_chosen = window, True
    trace.windows = args.windows()
    g = torch.Generator().manual_seed(seed)
    if prompts is None:
        prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in prompt_lengths]
    prompts = [list(map(int, p)) for p in prompts]
    longest = max(len(p) for p in prompts) + max_tokens
    engine = Engine(model, None, max_rows=len(prompts), chunk_size=chunk_size,
                    max_seq_len=max_seq_len or min(args.max_seq_len, longest), max_batch_tokens=max_batch_tokens,
                    attention=attention, backend="torch", trace=trace, mixed=mixed)   # type: ignore[arg-type]
    done = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_on_eos=False))
    model.observe_routing(None)
    return [c.tokens for c in done], engine.cache


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
