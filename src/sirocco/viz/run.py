"""Runs that fill a trace: prompts through the real engine (``record_run``), and pipeline stage events
(``record_pipeline``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import backends
from ..cache import RollingCache
from ..config import ModelArgs
from ..generate.engine import Engine
from ..generate.sampling import SamplingParams
from ..generate.speculation import Speculation
from ..model import Transformer
from .trace import Trace

if TYPE_CHECKING:
    from ..distributed.launch import DistContext


def record_run(model: Transformer, prompt_lengths: Sequence[int], window: int | None, chunk_size: int, max_tokens: int,
               trace: Trace, max_batch_tokens: int | None = None, seed: int = 0,
               prompts: Sequence[Sequence[int]] | None = None, attention: str = "per_sequence",
               max_seq_len: int | None = None, mixed: bool = False,
               speculation: Speculation | None = None) -> tuple[list[list[int]], RollingCache]:
    """Generate ``max_tokens`` greedy tokens for random prompts of these lengths (or the given ``prompts``) with
    ``Engine(..., trace=trace)``, every prompt in its own cache row, with the model put on the plain-PyTorch
    backend (``backends.attach``).

    ``window``: the window whose masks and cache the trace shows (None: the model's smallest). ``attention``:
    the pre-fill attention path. ``max_seq_len``: sizes the cache (default: just big enough). ``mixed``: the
    engine's mixed steps; off by default so that the pictures show the textbook schedule (all pre-fill, then
    decode) and prompt i keeps row i to the end (with mixed steps a short prompt can finish while others are
    still pre-filling, and its row is then taken by another). ``speculation``: speculative decoding (the model is
    then put on the cpu backend, which it needs). Returns the generated ids per prompt and the cache the run
    filled.
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
    # the plain-PyTorch reference; speculative decoding needs the cpu backend's row-exact kernels
    backends.attach(model, "torch" if speculation is None else "cpu", prefill=attention)   # type: ignore[arg-type]
    engine = Engine(model, None, max_rows=len(prompts), chunk_size=chunk_size,
                    max_seq_len=max_seq_len or min(args.max_seq_len, longest), max_batch_tokens=max_batch_tokens,
                    trace=trace, mixed=mixed, speculation=speculation)
    done = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_on_eos=False))
    model.observe_routing(None)
    return [c.tokens for c in done], engine.cache


def _pipeline_rank(ctx: DistContext, args: ModelArgs, micro_batches: int, rows: int, seq_len: int, schedule: str,
                   seed: int) -> list:
    """One rank of a real pipeline training step: a warm-up step, then the timed one; returns its events."""
    from ..distributed.pipeline_train import PipelineStep
    from ..distributed.stages import rank_stage
    from ..train.data import Batch

    stage = rank_stage(ctx, args, seed=seed)
    step_fn = PipelineStep(stage, ctx, n_microbatches=micro_batches, schedule=schedule)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (rows * micro_batches, seq_len), generator=g).split(rows)
    batches = [Batch(t, t.roll(-1, dims=1), torch.arange(seq_len).repeat(rows, 1)) for t in tokens]
    step_fn.train_step(batches)                         # warm-up: the first backward allocates and is slow
    step_fn.module.events = []
    step_fn.train_step(batches)
    return step_fn.module.events


def record_pipeline(args: ModelArgs, stages: int, micro_batches: int, tokens: int, trace: Trace, seed: int = 0,
                    schedule: str = "gpipe", rows: int = 1) -> None:
    """The forward and backward events of every stage and micro-batch in one real pipeline training step:
    ``stages`` processes on this machine (gloo, one thread each), ``PipelineStep`` with the ``schedule``
    ("gpipe" or "1f1b"), micro-batches of ``rows`` rows of ``tokens`` tokens. Times are each process's
    ``time.perf_counter()``, a clock the processes of one machine share."""
    from ..distributed.launch import spawn_local

    if args.n_layers < stages:
        args = args.replace(n_layers=stages)
    results = spawn_local(_pipeline_rank, stages, (args, micro_batches, rows, tokens, schedule, seed),
                          timeout_s=120, deadline_s=300)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"pipeline rank {failed[0].rank} failed: {failed[0].error}")
    for r in results:
        for kind, mb, t0, t1 in r.value:
            trace.on_pipeline_event(r.rank, kind, mb, t0, t1)
