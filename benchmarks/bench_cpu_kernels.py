"""The CPU backend's kernels against PyTorch's paths on the shapes of a 1B Mistral, in one process.

    linear     small_m_linear against F.linear at 1 and 8 rows, bf16 and fp32, each weight shape (K=2048
               N=2048/512/7168, K=7168 N=2048): GB/s of weight bytes read and the fraction of the read
               bandwidth (the better of two probes, before and after), the weights cycled through copies that
               together exceed the last-level cache, as bench_quant_kernels.py does
    prefill    bf16 products of 16..2048 rows: bf16 F.linear against upcast_linear (fp32 with the weight upcast
               by tiles), and fp32 F.linear on fp32 weights: ms and GFLOP/s
    attention  decode attention of 8 sequences over 929 slots, 16 heads of 128 (4 kv heads): the C++ kernels
               against the matmul path, ms per layer
    norms      RMSNorm (dim 2048) and RoPE (16 heads of 128) of one decode row: the C++ kernels against
               PyTorch's, us per call
    sdpa       causal pre-fill attention of 512 and 2048 tokens, 16 heads of 128 (4 kv heads): PyTorch's SDPA in
               bf16 against fp32 (whether a bf16 pre-fill's attention would gain from an upcast too), ms

Variants of one case are timed in alternated rounds (ABAB) and the median of the rounds' best calls is
reported; on a shared host the figures still swing by 20% and more (compare --threads 1).

    python benchmarks/bench_cpu_kernels.py [--threads 2] [--only linear,prefill,attention,norms,sdpa] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench_quant_kernels import FOOTPRINT, SHAPES, best_time, cycling, read_bandwidth
from sirocco.backends.cpu import kernels, modules


def rounds(variants: dict, n: int, best_of) -> dict:
    """Median over n rounds of ``best_of(fn)`` for each variant, the order reversed every other round."""
    out: dict = {name: [] for name in variants}
    names = list(variants)
    for r in range(n):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(best_of(variants[name]))
    return {name: statistics.median(v) for name, v in out.items()}


def linear_rows(n_rounds: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        small_m_linear = kernels.native_kernel(dtype)
        for k, n in SHAPES:
            nbytes = n * k * dtype.itemsize
            ws = [(torch.randn(n, k) * 0.02).to(dtype) for _ in range(-(-FOOTPRINT // nbytes))]
            for m in (1, 8):
                x = torch.randn(m, k).to(dtype)
                variants = {"F.linear": cycling(lambda i, x=x, ws=ws: F.linear(x, ws[i]), nbytes)}
                if small_m_linear is not None:
                    variants["small_m_linear"] = cycling(lambda i, f=small_m_linear, x=x, ws=ws: f(x, ws[i]), nbytes)
                with torch.inference_mode():
                    t = rounds(variants, n_rounds, lambda fn: best_time(fn, calls=20, min_seconds=0.2))
                for name, s in t.items():
                    rows.append(dict(kernel=name, dtype=str(dtype)[6:], K=k, N=n, M=m, us=s * 1e6,
                                     gb_per_s=nbytes / s / 1e9))
    return rows


def prefill_rows(n_rounds: int, ms: list[int]) -> list[dict]:
    rows = []
    for n, k in ((7168, 2048), (2048, 7168)):
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        wf = w.float()
        for m in ms:
            x = torch.randn(m, k).to(torch.bfloat16)
            xf = x.float()
            variants = {"bf16 F.linear": lambda x=x, w=w: F.linear(x, w),
                        "upcast_linear": lambda x=x, w=w: kernels.upcast_linear(x, w),
                        "fp32 F.linear": lambda xf=xf, wf=wf: F.linear(xf, wf)}
            with torch.inference_mode():
                t = rounds(variants, n_rounds if m <= 512 else 1, lambda fn: best_time(fn, calls=2, min_seconds=0))
            for name, s in t.items():
                rows.append(dict(kernel=name, K=k, N=n, M=m, ms=s * 1e3, gflop_per_s=2 * m * n * k / s / 1e9))
    return rows


def attention_rows(n_rounds: int) -> list[dict]:
    from sirocco.model.attention import decode_attention
    rows = []
    B, H, G, D, L = 8, 16, 4, 128, 929
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(B, H, D).to(dtype)
        k, v = torch.randn(B, G, L, D).to(dtype), torch.randn(B, G, L, D).to(dtype)
        valid = torch.ones(B, L, dtype=torch.bool)
        variants = {"matmul": lambda q=q, k=k, v=v, valid=valid: decode_attention(q, k, v, valid)}
        if kernels.native_serves(dtype, D, "attention"):
            variants["C++"] = lambda q=q, k=k, v=v, valid=valid: modules.native_decode_attention(q, k, v, valid)
        with torch.inference_mode():
            t = rounds(variants, n_rounds, lambda fn: best_time(fn, calls=20, min_seconds=0.2))
        rows += [dict(kernel=name, dtype=str(dtype)[6:], ms=s * 1e3) for name, s in t.items()]
    return rows


def norm_rows(n_rounds: int) -> list[dict]:
    from sirocco.model import RMSNorm, apply_rope, rope_tables
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        norm = RMSNorm(2048, 1e-5).to(dtype)
        fast = modules.CpuRMSNorm.of(norm)
        ops = modules.CpuAttentionOps()
        x = torch.randn(1, 2048).to(dtype)
        cos, sin = rope_tables(128, 4096, 1e6)
        h = torch.randn(1, 16, 128).to(dtype)
        c, s = cos[5:6], sin[5:6]
        variants = {"RMSNorm": lambda norm=norm, x=x: norm(x), "CpuRMSNorm": lambda fast=fast, x=x: fast(x),
                    "apply_rope": lambda h=h, c=c, s=s: apply_rope(h, c, s),
                    "CpuAttentionOps.rope": lambda ops=ops, h=h, c=c, s=s: ops.rope(h, c, s)}
        with torch.inference_mode():
            t = rounds(variants, n_rounds, lambda fn: best_time(fn, calls=200, min_seconds=0.05))
        rows += [dict(kernel=name, dtype=str(dtype)[6:], us=s * 1e6) for name, s in t.items()]
    return rows


def sdpa_rows(n_rounds: int) -> list[dict]:
    rows = []
    for t in (512, 2048):
        q, k, v = torch.randn(1, 16, t, 128), torch.randn(1, 4, t, 128), torch.randn(1, 4, t, 128)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        variants = {
            "bf16": lambda qb=qb, kb=kb, vb=vb: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                                              enable_gqa=True),
            "fp32": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        with torch.inference_mode():
            ts = rounds(variants, n_rounds, lambda fn: best_time(fn, calls=3, min_seconds=0))
        rows += [dict(kernel=name, tokens=t, ms=s * 1e3) for name, s in ts.items()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="linear,prefill,attention,norms,sdpa")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-rows", default="16,64,512,2048", help="comma-separated row counts of the pre-fill")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    only = a.only.split(",")
    cpu = dict(capability=torch.backends.cpu.get_cpu_capability(), avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
               amx=torch.cpu._is_amx_tile_supported(), builds={str(d)[6:]: kernels.kernel_isa(d)
                                                               for d in (torch.bfloat16, torch.float32)},
               bf16_gemm_is_slow=kernels.bf16_gemm_is_slow(), threads=a.threads,
               load_average_before=os.getloadavg()[0])
    out: dict = dict(cpu=cpu)
    t0 = time.perf_counter()
    if "linear" in only:
        out["read_bandwidth_gb_per_s"] = read_bandwidth()
        out["linear"] = linear_rows(a.rounds)
        out["read_bandwidth_gb_per_s"] = max(out["read_bandwidth_gb_per_s"], read_bandwidth())
        for r in out["linear"]:
            r["fraction_of_bound"] = r["gb_per_s"] / out["read_bandwidth_gb_per_s"]
    if "prefill" in only:
        out["prefill"] = prefill_rows(a.rounds, [int(m) for m in a.prefill_rows.split(",")])
    if "attention" in only:
        out["attention"] = attention_rows(a.rounds)
    if "norms" in only:
        out["norms"] = norm_rows(a.rounds)
    if "sdpa" in only:
        out["sdpa"] = sdpa_rows(a.rounds)
    cpu["load_average_after"] = os.getloadavg()[0]
    cpu["seconds"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"CPU {cpu}")
    if "linear" in out:
        print(f"read bandwidth (best 16 MiB chunk sum): {out['read_bandwidth_gb_per_s']:.1f} GB/s")
        print(f"{'kernel':<15} {'dtype':<9} {'K':>5} {'N':>5} {'M':>2} {'us':>9} {'GB/s':>6} {'of bound':>8}")
        for r in out["linear"]:
            print(f"{r['kernel']:<15} {r['dtype']:<9} {r['K']:>5} {r['N']:>5} {r['M']:>2} {r['us']:>9.1f} "
                  f"{r['gb_per_s']:>6.1f} {r['fraction_of_bound']:>8.0%}")
    for r in out.get("prefill", []):
        print(f"pre-fill {r['kernel']:<14} K={r['K']:>5} N={r['N']:>5} M={r['M']:>5} {r['ms']:>9.1f} ms "
              f"{r['gflop_per_s']:>6.1f} GFLOP/s")
    for r in out.get("attention", []):
        print(f"decode attention {r['kernel']:<7} {r['dtype']:<9} {r['ms']:.2f} ms per layer")
    for r in out.get("norms", []):
        print(f"one decode row {r['kernel']:<21} {r['dtype']:<9} {r['us']:.1f} us")
    for r in out.get("sdpa", []):
        print(f"causal SDPA {r['tokens']} tokens {r['kernel']}: {r['ms']:.1f} ms")


if __name__ == "__main__":
    main()
