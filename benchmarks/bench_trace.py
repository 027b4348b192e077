"""What the trace hooks cost: decode steps of the same engine with no trace (the default) and with a
``viz.Trace``, and the cost of the hooks themselves when off (one ``is not None`` test each).

    python benchmarks/bench_trace.py [--dim 512 --layers 8 --rows 4 --tokens 64] [--json]

Off, the engine pays two attribute tests per step and each MoE layer one; the script times those tests and
prints them as a share of a decode step. On, the trace copies each step's plan and mask to the host: that cost is
printed too (it is for pictures, not for serving).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit

import torch

from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model
from sirocco.viz import Trace


def decode_ms_per_step(engine: Engine, prompts: list[list[int]], tokens: int, repeats: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_on_eos=False)
    engine.generate(prompts, SamplingParams(max_tokens=2, stop_on_eos=False))          # warm-up
    runs = []
    for _ in range(repeats):
        engine.stats = type(engine.stats)()
        engine.generate(prompts, params)
        runs.append(engine.stats.decode_seconds / max(1, engine.stats.decode_steps) * 1e3)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--moe", action="store_true", help="a Mixtral-style model (the router hook too)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args = preset("tiny-moe" if a.moe else "tiny", dim=a.dim, n_layers=a.layers, head_dim=64, n_heads=a.dim // 64,
                  n_kv_heads=max(1, a.dim // 256), hidden_dim=a.dim * 3, vocab_size=8192, sliding_window=None,
                  max_seq_len=256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 8192, (32,), generator=g).tolist() for _ in range(a.rows)]
    model = build_model(args, seed=0)
    engines = {"off": Engine(model, None, max_rows=a.rows, max_seq_len=256),
               "on": Engine(model, None, max_rows=a.rows, max_seq_len=256, trace=Trace())}
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(a.repeats):              # alternated, so that a slow phase of the host hits both alike
        for name, engine in engines.items():
            times[name].append(decode_ms_per_step(engine, prompts, a.tokens, 1))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    holder = type("Holder", (), {"trace": None})()
    n = 1_000_000
    check_ns = timeit.timeit("holder.trace is not None", globals={"holder": holder}, number=n) / n * 1e9
    checks = 2 + (a.layers if a.moe else 0)
    result = {"decode_ms_trace_off": off, "decode_ms_trace_on": on, "hook_check_ns": check_ns,
              "checks_per_step": checks, "off_share_of_step": checks * check_ns * 1e-6 / off}
    print(f"decode step, {a.rows} rows, dim {a.dim}, {a.layers} layers{' (MoE)' if a.moe else ''}: "
          f"{off:.2f} ms without a trace, {on:.2f} ms with one ({on / off:.2f}x)", file=sys.stderr)
    print(f"hooks when off: {checks} tests of {check_ns:.0f} ns per step = {result['off_share_of_step']:.1e} of a "
          f"step", file=sys.stderr)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
