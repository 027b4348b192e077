"""sirocco's backends against each other on one model in one process, their timings alternated round by round.

The model (the 1B Mistral shape of bench_inference.py, random weights, the checkpoint it writes) is loaded once;
each round puts it on every backend in turn (``backends.attach``, in place: the same weights), in ABBA order, and
times on each:

    prefill   a 512-token prompt to its first token: tokens/s
    decode    batch 1, 64-token prompt: (time for N tokens - time for 1) / (N - 1): tokens/s
    decode8   8 prompts of 64 tokens decoded together: 8 (N - 1) / (time for N tokens - time for 1): tokens/s

"torch" is the plain-PyTorch reference (F.linear, SDPA, PyTorch's norms); "cpu" the CPU backend (backends/cpu/).
Each ratio is taken within a round, so both backends saw nearly the same machine; the summary gives the median
and the range over rounds. The CPU and the kernel builds used are printed (``torch.backends.cpu``'s reading).

    python benchmarks/bench_backends.py --workdir /tmp/sirocco-bench                  # bf16, 3 rounds
    python benchmarks/bench_backends.py --dtype float32 --decode-tokens 32 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bench_inference as bi


def cpu_description() -> dict:
    import torch
    checks = {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
              for name in ("avx2", "avx512", "avx512_bf16", "amx_tile")}
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    return dict(model=model, capability=torch.backends.cpu.get_cpu_capability(), **checks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=bi.DTYPES, default="bfloat16")
    ap.add_argument("--backends", default="torch,cpu", help="comma-separated, from: torch, cpu")
    ap.add_argument("--only", default="prefill,decode,decode8", help="comma-separated, from: prefill, decode, decode8")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--decode-tokens", type=int, default=32, help="N, tokens generated per decode timing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workdir", type=Path, default=bi.HERE / ".cache", help="where the checkpoints are (or go)")
    ap.add_argument("--quick", action="store_true", help="the small shape, to check the script in seconds")
    ap.add_argument("--json", action="store_true", help="print the rounds and the summary as JSON to stdout")
    a = ap.parse_args(argv)
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    only = [m.strip() for m in a.only.split(",") if m.strip()]

    import torch

    from sirocco import backends
    from sirocco.checkpoint import load_model
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    torch.set_num_threads(a.threads)
    shape, work = bi.QUICK if a.quick else bi.FULL
    path = bi.checkpoint_dir(a.workdir, shape, a.dtype)
    if not (path / "config.json").exists():
        bi.build_checkpoints(a.workdir, shape, [a.dtype])
    model = load_model(path, dtype=getattr(torch, a.dtype), device="cpu")
    n = a.decode_tokens
    max_seq_len = max(work.prefill_len, work.decode_prompt + n) + 2
    engines = {rows: Engine(model, None, max_rows=rows, max_seq_len=max_seq_len) for rows in (1, 8)}
    [prefill_prompt] = bi.random_prompts([work.prefill_len], shape.vocab_size, seed=1)
    decode_prompts = bi.random_prompts([work.decode_prompt] * 8, shape.vocab_size, seed=2)

    def generate(rows: int, prompts: list[list[int]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_on_eos=False)
        t0 = time.perf_counter()
        engines[rows].generate(prompts, params)
        return time.perf_counter() - t0

    def measure(what: str) -> float:
        if what == "prefill":
            return work.prefill_len / generate(1, [prefill_prompt], 1)
        rows = 1 if what == "decode" else 8
        prompts = decode_prompts[:rows]
        return rows * (n - 1) / (generate(rows, prompts, n) - generate(rows, prompts, 1))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"{shape.name} {a.dtype}, {a.threads} threads; CPU {cpu_description()}")
    rounds = []
    for r in range(a.rounds + 1):                                  # round 0: warm-up (builds, caches), not kept
        order = names if r % 2 == 0 else names[::-1]
        row: dict = {"round": r, "first": order[0]}
        for name in order:
            chosen = backends.attach(model, name).backend
            for what in only:
                row[f"{name}_{what}"] = measure(what)
            row[f"{name}_attached"] = chosen
        if r > 0:
            rounds.append(row)
            log(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if "cpu" in names:
        from sirocco.backends.cpu import kernels
        isa = getattr(kernels, "kernel_isa", None)
        builds = {str(d)[6:]: isa(d) if isa else ("avx512" if kernels.native_serves(d, 2048) else None)
                  for d in (torch.bfloat16, torch.float32)}
    summary = {}
    for what in only:
        for name in names:
            values = [row[f"{name}_{what}"] for row in rounds]
            summary[f"{name}_{what}"] = dict(median=statistics.median(values), min=min(values), max=max(values))
        if len(names) == 2:
            ratios = [row[f"{names[1]}_{what}"] / row[f"{names[0]}_{what}"] for row in rounds]
            summary[f"{what}_ratio"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
    for key, s in summary.items():
        unit = "" if key.endswith("ratio") else " tokens/s"
        log(f"{key:<16} median {s['median']:8.2f}{unit} (range {s['min']:.2f} - {s['max']:.2f})")
    if a.json:
        print(json.dumps(dict(shape=shape.name, dtype=a.dtype, threads=a.threads, decode_tokens=n,
                              cpu=cpu_description(), kernel_builds=builds if "cpu" in names else None,
                              rounds=rounds, summary=summary), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
