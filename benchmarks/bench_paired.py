"""sirocco and transformers in one process, their timings alternated, for ratios the host's drift cannot bend.

bench_inference.py measures each library in its own process, one after the other: right for peak memory, but on
a shared host whose matmul rate and read bandwidth swing by 20-40% within seconds, a library can be timed in a
slow phase and the other in a fast one. Here both load the same checkpoint (the one bench_inference.py wrote)
into one process and take turns, round after round, in ABBA order (sirocco first in even rounds, transformers
first in odd ones):

    prefill   a prompt of each --prefill-lens length (512 and 2048 tokens by default) to its first token: tokens/s
              per library per round, and their ratio
    decode    batch 1, 64-token prompt: (time for 128 tokens - time for 1) / 127: tokens/s and ratio; the read
              bandwidth is probed (as bench_inference.py does: best of 5 sums over 2 GiB) right before and right
              after sirocco's timed decode, and its fraction of the bound uses the higher of the two probes

Each ratio is taken within a round, so both libraries saw nearly the same machine; the summary gives the median
and the range over rounds.

    python benchmarks/bench_paired.py                            # bf16, 5 rounds after a warm-up (about 8 min)
    python benchmarks/bench_paired.py --moe                      # the Mixtral shape of bench_inference --moe
    python benchmarks/bench_paired.py --dtype float32 --rounds 3 --prefill-lens 512 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import bench_inference as bi


def seconds(fn) -> float:
    """Wall seconds of one call, no warm-up: the rounds alternate the libraries call by call."""
    return bi.timed(fn, 1, warm_up=False)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=bi.DTYPES, default="bfloat16")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workdir", type=Path, default=bi.HERE / ".cache", help="where the checkpoints are")
    ap.add_argument("--quick", action="store_true", help="the small shape, to check the script in seconds")
    ap.add_argument("--moe", action="store_true",
                    help="bench_inference's Mixtral shape (8 experts of 3584, top 2) instead of the dense 1B")
    ap.add_argument("--prefill-lens", default=None,
                    help="comma-separated pre-fill prompt lengths (default 512,2048; the small shape: its own)")
    ap.add_argument("--json", action="store_true", help="print the rounds and the summary as JSON to stdout")
    a = ap.parse_args(argv)

    import torch
    from tqdm import tqdm
    torch.set_num_threads(a.threads)
    shape, work = bi.shape_for(a.quick, a.moe)
    lens = ([int(n) for n in a.prefill_lens.split(",")] if a.prefill_lens
            else [work.prefill_len] if a.quick else [512, 2048])
    path = bi.checkpoint_dir(a.workdir, shape, a.dtype)
    if not (path / "config.json").exists():
        bi.build_checkpoints(a.workdir, shape, [a.dtype])
    dtype = getattr(torch, a.dtype)
    runners = [bi.SiroccoRunner(None), bi.TransformersRunner()]
    for r in runners:
        r.imports()
        r.load(path, dtype)
        r.prepare([1], max(*lens, work.decode_prompt + work.decode_tokens) + 2)
    prefill_prompts = dict(zip(lens, bi.random_prompts(lens, shape.vocab_size, seed=1), strict=True))
    [decode_prompt] = bi.random_prompts([work.decode_prompt], shape.vocab_size, seed=2)
    n = work.decode_tokens
    probe = bi.bandwidth_probe(a.quick)

    rounds = []
    for i in tqdm(range(a.rounds + 1), desc="rounds", file=sys.stderr):
        order = runners if i % 2 == 0 else runners[::-1]
        row: dict = {"round": i, "first": order[0].name}
        for n_pre, prompt in prefill_prompts.items():
            for r in order:
                row[f"{r.name}_prefill_{n_pre}"] = n_pre / seconds(lambda r=r, prompt=prompt: r.generate([prompt], 1))
            row[f"prefill_ratio_{n_pre}"] = row[f"sirocco_prefill_{n_pre}"] / row[f"transformers_prefill_{n_pre}"]
        for r in order:
            one = seconds(lambda r=r: r.generate([decode_prompt], 1))
            before = probe() if r.name == "sirocco" else None
            many = seconds(lambda r=r: r.generate([decode_prompt], n))
            row[f"{r.name}_decode"] = (n - 1) / (many - one)
            if before is not None:
                row["bandwidth"] = max(before, probe())
        row["decode_ratio"] = row["sirocco_decode"] / row["transformers_decode"]
        row["decode_fraction"] = row["sirocco_decode"] / shape.decode_bound(row["bandwidth"], a.dtype)
        if i > 0:                                                   # round 0 warms both libraries up
            rounds.append(row)

    pre_keys = [f"{k}_{n}" for n in lens for k in ("sirocco_prefill", "transformers_prefill", "prefill_ratio")]
    keys = (*pre_keys, "sirocco_decode", "transformers_decode", "decode_ratio", "bandwidth", "decode_fraction")
    summary = {k: {"median": statistics.median(r[k] for r in rounds), "min": min(r[k] for r in rounds),
                   "max": max(r[k] for r in rounds)} for k in keys}
    pre_head = "".join(f"| pre-fill {n} tok/s sirocco / transformers | ratio " for n in lens)
    lines = [f"{a.dtype}, shape {shape.name}, {a.threads} threads, {len(rounds)} rounds (ABBA), one process", "",
             f"| round {pre_head}| decode tok/s sirocco / transformers | ratio | read GB/s | decode / bound |",
             "|---" * (5 + 2 * len(lens)) + "|"]
    for r in rounds:
        pre = "".join(f"| {r[f'sirocco_prefill_{n}']:.1f} / {r[f'transformers_prefill_{n}']:.1f} "
                      f"| {r[f'prefill_ratio_{n}']:.2f}x " for n in lens)
        lines.append(f"| {r['round']} {pre}| {r['sirocco_decode']:.1f} / {r['transformers_decode']:.1f} "
                     f"| {r['decode_ratio']:.2f}x | {r['bandwidth'] / 1e9:.1f} | {r['decode_fraction']:.0%} |")
    s = summary
    lines.append("")
    for n in lens:
        k = f"prefill_ratio_{n}"
        lines.append(f"pre-fill {n} tokens: sirocco / transformers {s[k]['median']:.2f}x median "
                     f"({s[k]['min']:.2f}-{s[k]['max']:.2f}x over rounds)")
    lines += [f"decode, batch 1: sirocco / transformers {s['decode_ratio']['median']:.2f}x median "
              f"({s['decode_ratio']['min']:.2f}-{s['decode_ratio']['max']:.2f}x); of the bound from the probes "
              f"around it {s['decode_fraction']['median']:.0%} median "
              f"({s['decode_fraction']['min']:.0%}-{s['decode_fraction']['max']:.0%})"]
    print("\n".join(lines), file=sys.stderr)
    if a.json:
        print(json.dumps({"dtype": a.dtype, "shape": shape.name, "moe": a.moe, "prefill_lens": lens,
                          "threads": a.threads, "rounds": rounds,
                          "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
