"""How much the micro-batches of ``PipelineExecutor`` gain: the same generation on N ranks of this machine with
1 (no overlap), 2, 4... micro-batches per step, and in one process for reference.

    python benchmarks/bench_pipeline.py --ranks 2 --micro-batches 1 2 4

Random weights (a small model with Mistral 7B's proportions by default); one thread per rank, so N ranks use
N cores; each figure is the median of a few runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sirocco.config import ModelArgs
from sirocco.distributed.executor import PipelineExecutor
from sirocco.distributed.launch import spawn_local
from sirocco.distributed.stages import rank_stage
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model


def bench_args(dim: int, layers: int, vocab: int) -> ModelArgs:
    """Mistral 7B's proportions (hidden 3.5 x dim, 4 query heads per kv head, head_dim 64 here), smaller."""
    return ModelArgs(dim=dim, n_layers=layers, head_dim=64, hidden_dim=dim * 7 // 2, n_heads=dim // 64,
                     n_kv_heads=max(1, dim // 256), norm_eps=1e-5, vocab_size=vocab, sliding_window=None,
                     max_seq_len=1024)


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int, repeats: int) -> dict:
    """Median over ``repeats`` runs of pre-fill and decode throughput (the machine is shared: runs vary)."""
    params = SamplingParams(max_tokens=max_tokens, stop_on_eos=False)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2))          # warm-up
    runs = []
    for _ in range(repeats):
        engine.stats = type(engine.stats)()
        t0 = time.perf_counter()
        done = engine.generate(prompts, params)
        runs.append((time.perf_counter() - t0, engine.stats.prefill_tps, engine.stats.decode_tps))
    seconds, prefill, decode = (statistics.median(x) for x in zip(*runs, strict=True))
    return {"seconds": seconds, "prefill_tps": prefill, "decode_tps": decode, "tokens": [c.tokens for c in done]}


def _rank(ctx, args: ModelArgs, micro_batches: int, min_tokens: int, n_prompts: int, length: int,
          max_tokens: int, repeats: int) -> dict:
    stage = rank_stage(ctx, args, seed=0)
    engine = Engine(stage, None, executor=PipelineExecutor(stage, ctx, micro_batches=micro_batches,
                                                           min_group_tokens=min_tokens),
                    max_rows=n_prompts, max_seq_len=length + max_tokens, chunk_size=length)
    return _run(engine, _prompts(n_prompts, length, args.vocab_size), max_tokens, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--min-group-tokens", type=int, default=64)
    a = p.parse_args()
    args = bench_args(a.dim, a.layers, a.vocab)
    print(f"model: dim {a.dim}, {a.layers} layers, {args.num_parameters() / 1e6:.0f}M parameters, fp32; "
          f"{a.prompts} prompts of {a.prompt_len} tokens, {a.max_tokens} new tokens each")
    torch.set_num_threads(a.ranks)
    one = _run(Engine(build_model(args, seed=0), None, max_rows=a.prompts, chunk_size=a.prompt_len,
                      max_seq_len=a.prompt_len + a.max_tokens),
               _prompts(a.prompts, a.prompt_len, a.vocab), a.max_tokens, a.repeats)
    print(f"1 process, {a.ranks} threads: pre-fill {one['prefill_tps']:7.0f} tok/s, decode "
          f"{one['decode_tps']:6.1f} tok/s, {one['seconds']:.2f} s")
    base = None
    for m in a.micro_batches:
        results = spawn_local(_rank, a.ranks, (args, m, a.min_group_tokens, a.prompts, a.prompt_len,
                                               a.max_tokens, a.repeats), timeout_s=300)
        bad = [r for r in results if not r.ok]
        if bad:
            raise SystemExit(f"rank {bad[0].rank} failed: {bad[0].error}")
        r = results[0].value
        same = r["tokens"] == one["tokens"]
        base = base or r
        print(f"{a.ranks} ranks, {m} micro-batches: pre-fill {r['prefill_tps']:7.0f} tok/s "
              f"(x{r['prefill_tps'] / base['prefill_tps']:.2f}), decode {r['decode_tps']:6.1f} tok/s "
              f"(x{r['decode_tps'] / base['decode_tps']:.2f}), {r['seconds']:.2f} s; tokens as 1 process: {same}")


if __name__ == "__main__":
    main()
