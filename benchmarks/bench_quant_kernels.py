"""Decode products over quantized weights against the memory-bandwidth bound, on the shapes of a 1B Mistral.

In one run: the machine's read bandwidth (the sum of a large fp32 tensor, best of a few), then for each weight
shape (K=2048 N=2048/512/7168, K=7168 N=2048) bf16 F.linear and the q8_0 / q4_0 kernels at M = 1 and 8 rows.
Each is reported as GB/s of weight bytes read (bf16: 2 bytes per weight; q8_0: 34 per 32; q4_0: 18 per 32) and
as the fraction of the measured read bandwidth. Each case cycles through copies of its weight that together
exceed the last-level cache (FOOTPRINT bytes), so the weights come from memory as in a model's decode step.
Figures swing +-20% with the host's load, more when another process keeps a core busy (then the second thread
waits for its time slice: compare with --threads 1).

    python benchmarks/bench_quant_kernels.py [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant.formats import quantize

SHAPES = [(2048, 2048), (2048, 512), (2048, 7168), (7168, 2048)]        # (K, N)
FOOTPRINT = 128 * 2**20                                                  # 4x the 32 MiB L3 of the test machine


def cycling(make, nbytes: int):
    """A function calling ``make(copy)`` on each of ceil(FOOTPRINT / nbytes) copies in turn."""
    state = {"i": 0}
    copies = -(-FOOTPRINT // nbytes)

    def fn():
        state["i"] = (state["i"] + 1) % copies
        return make(state["i"])
    return fn


def best_time(fn, min_seconds: float = 0.25, rounds: int = 5) -> float:
    """Best over ``rounds`` of the mean time of one call over a batch of about min_seconds / rounds."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_seconds / rounds / once))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def read_bandwidth(megabytes: int = 512) -> float:
    """GB/s of a sum over a tensor much larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / best_time(lambda: x.sum(), min_seconds=1.0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not qk.kernel_available():
        raise SystemExit("the quantized C++ kernels are not available here (see the log)")
    bandwidth = read_bandwidth()
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.02
        weights = {"bf16": w.to(torch.bfloat16)}
        weights.update({fmt: quantize(w, fmt) for fmt in ("q8_0", "q4_0")})
        copies = {name: [t.clone() for _ in range(-(-FOOTPRINT // (t.numel() * t.element_size())))]
                  for name, t in weights.items()}
        for m in (1, 8):
            xb = torch.randn(m, k).to(torch.bfloat16)
            for name, ws in copies.items():
                nbytes = ws[0].numel() * ws[0].element_size()
                if name == "bf16":
                    fn = cycling(lambda i, ws=ws: F.linear(xb, ws[i]), nbytes)
                    name = "bf16 F.linear"
                else:
                    fn = cycling(lambda i, ws=ws, fmt=name: qk.qlinear(xb, ws[i], fmt), nbytes)
                    name = f"{name} qlinear"
                with torch.inference_mode():
                    t = best_time(fn)
                gbs = nbytes / t / 1e9
                rows.append(dict(kernel=name, K=k, N=n, M=m, us=t * 1e6, weight_bytes=nbytes, gb_per_s=gbs,
                                 fraction_of_bound=gbs / bandwidth))
    if a.json:
        print(json.dumps(dict(threads=a.threads, read_bandwidth_gb_per_s=bandwidth,
                              isa=qk.native_module().qlinear_isa(), results=rows), indent=1))
        return
    print(f"read bandwidth (sum of 512 MiB fp32, best of 5): {bandwidth:.1f} GB/s; {a.threads} threads; "
          f"kernel path {qk.native_module().qlinear_isa()}")
    print(f"{'kernel':<15} {'K':>5} {'N':>5} {'M':>2} {'us':>8} {'GB/s':>6} {'of bound':>8}")
    for r in rows:
        print(f"{r['kernel']:<15} {r['K']:>5} {r['N']:>5} {r['M']:>2} {r['us']:>8.1f} {r['gb_per_s']:>6.1f} "
              f"{r['fraction_of_bound']:>8.0%}")


if __name__ == "__main__":
    main()
