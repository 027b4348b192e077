"""Decode products over quantized weights against the memory-bandwidth bound, on the shapes of a 1B Mistral.

In one run: the machine's read bandwidth (the sum of a large fp32 tensor in 16 MiB chunks, the best chunk, in
ordinary and in huge-page memory, before and after; the bound is the best), then for each weight shape (K=2048
N=2048/512/7168, K=7168 N=2048) bf16 F.linear and the kernel of every GGUF type (layouts.py) at M = 1 and 8 rows.
Each is reported as GB/s of weight bytes read (bf16: 2 bytes per weight; q8_0: 34 per 32; q4_K: 144 per 256;
...) and as the fraction of the measured read bandwidth; then per type and row count the figure of a whole
layer's seven matrices (wq, wk, wv, wo, w1, w3, w2: their bytes over the sum of their times). Each case cycles
through copies of its weight that together exceed twice the last-level cache (FOOTPRINT bytes), so the weights
come from memory as in a model's decode step; the quantized copies are in huge-page memory, as a loaded model's
blocks are. q8_0 and q4_0 weights are quantized from random normal ones; the other types are random blocks
(layouts.random_blocks): their kernels do the same work whatever the values.
Figures swing +-20% with the host's load, more when another process keeps a core busy (then the second thread
waits for its time slice: compare with --threads 1).

``--layouts`` compares the arrangements of the blocks in memory (interleave.py): "file" (GGUF's rows) and
"interleaved" (read by the AVX512-VNNI tiles); by default the one a loaded model gets here. With several, each
case is timed ``--rounds`` times per layout, the layouts in turn (file first in even rounds, interleaved first in
odd ones), and the median of the rounds is the figure, so a phase of the host's load falls on both.

    python benchmarks/bench_quant_kernels.py [--threads 2] [--types q4_K,q6_K] [--rows 1,8] [--json]
    python benchmarks/bench_quant_kernels.py --layouts file,interleaved --rounds 5 --types q4_K,q6_K
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant import layouts
from sirocco.backends.quant.formats import quantize
from sirocco.backends.quant.hugepages import huge_page_tensors
from sirocco.backends.quant.interleave import interleavable, interleave

SHAPES = [(2048, 2048), (2048, 512), (2048, 7168), (7168, 2048)]        # (K, N)
LAYER = {(2048, 2048): 2, (2048, 512): 2, (2048, 7168): 2, (7168, 2048): 1}   # wq, wo; wk, wv; w1, w3; w2


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), 32 MiB where it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


# Copies of each weight cycled through, twice the last-level cache at least, so that each call reads from memory:
# a fixed 128 MiB was 4x the L3 of the first test machine but fits in the 480 MiB one of a later host, where the
# kernels then read 40-50 GB/s "of memory" against a bound of 33.
FOOTPRINT = max(128 * 2**20, 2 * last_level_cache_bytes())


def cycling(make, nbytes: int):
    """A function calling ``make(copy)`` on each of ceil(FOOTPRINT / nbytes) copies in turn."""
    state = {"i": 0}
    copies = -(-FOOTPRINT // nbytes)

    def fn():
        state["i"] = (state["i"] + 1) % copies
        return make(state["i"])
    return fn


def best_time(fn, calls: int = 40, min_seconds: float = 0.3) -> float:
    """The fastest of at least ``calls`` single calls (and at least min_seconds of them): on a shared host a call
    that lost its core for a time slice says nothing about the kernel, so the best call is the figure."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < calls or spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        best, spent, n = min(best, t), spent + t, n + 1
    return best


def read_bandwidth(megabytes: int = FOOTPRINT // 2**20) -> float:
    """``read_bandwidth_of`` a FOOTPRINT fp32 tensor in ordinary memory and one in huge-page memory (where a loaded
    model's quantized blocks live, and which reads faster), the better of the two."""
    plain = read_bandwidth_of(torch.ones(megabytes * 2**20 // 4))
    [area] = huge_page_tensors([(megabytes * 2**20,)])
    return max(plain, read_bandwidth_of(area.view(torch.float32).fill_(1.0)))


def read_bandwidth_of(values: torch.Tensor, chunk_megabytes: int = 16) -> float:
    """GB/s of the fastest sum of one 16 MiB chunk of ``values`` (fp32), the chunks taken in turn (so each comes
    from memory, not cache): timed call by call like the kernels, so the bound and the kernels are measured the
    same way on a shared host."""
    chunks = values.chunk(values.numel() * 4 // 2**20 // chunk_megabytes)
    state = {"i": 0}

    def one():
        state["i"] = (state["i"] + 1) % len(chunks)
        chunks[state["i"]].sum()
    return chunk_megabytes * 2**20 / best_time(one, calls=3 * len(chunks)) / 1e9


def measure(name: str, weight: torch.Tensor, k: int, layout_names: list[str], row_counts: list[int],
            rounds: int) -> list[dict]:
    """One weight's rows of results: bf16 F.linear (``name`` "bf16"), or the kernel of type ``name`` over the blocks
    in each of ``layout_names`` (where the shape can take it), at each row count; each the median over ``rounds``
    of the best call, the layouts taken in turn within a round. The copies cycled through live only here."""
    if name == "bf16":
        variants = {"-": [weight.clone() for _ in range(-(-FOOTPRINT // (weight.numel() * 2)))]}
    else:
        variants = {}
        for layout in layout_names:
            if layout == "interleaved" and not interleavable(weight.shape, name):
                continue
            t = interleave(weight, name) if layout == "interleaved" else weight
            count = -(-FOOTPRINT // t.numel())
            # in huge-page memory, as a loaded model's blocks are (bf16 weights are file pages)
            variants[layout] = [c.copy_(t) for c in huge_page_tensors([tuple(t.shape)] * count)]
    out = []
    for m in row_counts:
        xb = torch.randn(m, k).to(torch.bfloat16)
        times: dict[str, list[float]] = {v: [] for v in variants}
        fns = {}
        for v, ws in variants.items():
            nbytes = ws[0].numel() * ws[0].element_size()
            fns[v] = cycling((lambda i, ws=ws, xb=xb: F.linear(xb, ws[i])) if name == "bf16" else
                             (lambda i, ws=ws, xb=xb, layout=v: qk.qlinear(xb, ws[i], name, layout=layout)), nbytes)
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for v in order:
                with torch.inference_mode():
                    times[v].append(best_time(fns[v]))
        for v, ws in variants.items():
            nbytes = ws[0].numel() * ws[0].element_size()
            t = statistics.median(times[v])
            out.append(dict(kernel="bf16 F.linear" if name == "bf16" else f"{name} qlinear", layout=v,
                            K=k, N=weight.shape[0], M=m, us=t * 1e6, weight_bytes=nbytes, gb_per_s=nbytes / t / 1e9,
                            fraction_of_bound=None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(layouts.TYPES),
                    help="comma-separated GGUF types to measure besides bf16 (default: all)")
    ap.add_argument("--rows", default="1,8", help="comma-separated activation row counts (1 to 8)")
    ap.add_argument("--layouts", default="auto",
                    help="comma-separated block layouts to compare (file, interleaved; default: the one a loaded "
                         "model gets on this CPU)")
    ap.add_argument("--rounds", type=int, default=1, help="timings per case and layout, layouts alternated")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    types = [t for t in a.types.split(",") if t]
    for t in types:
        layouts.layout(t)                                   # an unknown name stops here, by name
    row_counts = [int(r) for r in a.rows.split(",")]
    layout_names = ([("interleaved" if qk.interleaving_pays() else "file")] if a.layouts == "auto"
                    else [x for x in a.layouts.split(",") if x])
    for x in layout_names:
        qk.layout_code(x)                                   # an unknown name stops here, by name
    torch.set_num_threads(a.threads)
    if not qk.kernel_available():
        raise SystemExit("the quantized C++ kernels are not available here (see the log)")
    load_before = os.getloadavg()[0]
    bandwidth = read_bandwidth()
    rows = []
    g = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.02
        weights = {"bf16": w.to(torch.bfloat16)}
        weights.update({fmt: quantize(w, fmt) if fmt in ("q8_0", "q4_0") else layouts.random_blocks(n, k, fmt, g)
                        for fmt in types})
        for name, t in weights.items():
            rows += measure(name, t, k, layout_names, row_counts, a.rounds)
    bandwidth_after = read_bandwidth()
    bound = max(bandwidth, bandwidth_after)
    for r in rows:
        r["fraction_of_bound"] = r["gb_per_s"] / bound
    layer = []                               # per kernel and M: a layer's bytes over the sum of its matrices' times
    for kernel, layout in dict.fromkeys((r["kernel"], r["layout"]) for r in rows):
        for m in row_counts:
            mine = [r for r in rows if r["kernel"] == kernel and r["layout"] == layout and r["M"] == m]
            nbytes = sum(LAYER[r["K"], r["N"]] * r["weight_bytes"] for r in mine)
            us = sum(LAYER[r["K"], r["N"]] * r["us"] for r in mine)
            layer.append(dict(kernel=kernel, layout=layout, M=m, us=us, weight_bytes=nbytes,
                              gb_per_s=nbytes / us / 1e3, fraction_of_bound=nbytes / us / 1e3 / bound))
    load = dict(load_average_before=load_before, load_average_after=os.getloadavg()[0], cpus=os.cpu_count())
    if a.json:
        print(json.dumps(dict(threads=a.threads, read_bandwidth_gb_per_s=bandwidth,
                              read_bandwidth_after_gb_per_s=bandwidth_after, **load,
                              isa=qk.native_module().qlinear_isa(), results=rows, layer=layer), indent=1))
        return
    print(f"read bandwidth (sums of 16 MiB fp32 chunks, best, ordinary or huge-page memory): {bandwidth:.1f} GB/s "
          f"before, {bandwidth_after:.1f} after; {a.threads} threads; kernel path {qk.native_module().qlinear_isa()}; "
          f"load average {load['load_average_before']:.1f} -> {load['load_average_after']:.1f} on {load['cpus']} CPUs")
    if max(load["load_average_before"], load["load_average_after"]) > load["cpus"]:
        print("warning: other processes kept the CPUs busy: the figures understate the kernels")
    print(f"{'kernel':<15} {'layout':<11} {'K':>5} {'N':>5} {'M':>2} {'us':>8} {'GB/s':>6} {'of bound':>8}")
    for r in rows:
        print(f"{r['kernel']:<15} {r['layout']:<11} {r['K']:>5} {r['N']:>5} {r['M']:>2} {r['us']:>8.1f} "
              f"{r['gb_per_s']:>6.1f} {r['fraction_of_bound']:>8.0%}")
    print("\nthe seven matrices of a layer (2 x 2048x2048, 2 x 2048x512, 2 x 2048x7168, 7168x2048):")
    print(f"{'kernel':<15} {'layout':<11} {'M':>2} {'us':>8} {'GB/s':>6} {'of bound':>8}")
    for r in layer:
        print(f"{r['kernel']:<15} {r['layout']:<11} {r['M']:>2} {r['us']:>8.1f} {r['gb_per_s']:>6.1f} "
              f"{r['fraction_of_bound']:>8.0%}")


if __name__ == "__main__":
    main()
