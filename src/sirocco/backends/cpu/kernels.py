"""CPU kernels for what dominates inference once the big matrix products are done well: decode steps.

A decode step reads every weight once and multiplies it by one row per running sequence; ``F.linear`` streams
weights well below the machine's read rate for one to eight rows, and each small operation of the step (norms,
rotations) costs microseconds whatever its size. The C++ sources of csrc/, built at run time by
torch.utils.cpp_extension, once per instruction set (``BUILDS``: "avx512", and "avx2" for CPUs without AVX-512):

- ``small_m_linear`` (small_m_linear.cpp): 1 to 8 rows times a weight matrix, bf16 or fp32, fp32 sums, weights
  read where they are (no second copy, no new layout). Each output's bits do not depend on how many rows are
  multiplied at once, so a prompt decodes the same alone or packed.
- ``decode_scores`` / ``decode_values`` (decode_attention.cpp): one query per sequence over its cache row;
  ``decode_scores_at`` / ``decode_values_at`` the same over a whole layer cache through row and slot maps.
- ``rms_norm`` / ``rope`` (norm_rope.cpp): RMSNorm and RoPE in one pass each, rounded as the model rounds.
- ``moe_experts`` (moe_experts.cpp): a MoE layer's chosen experts for a decode step in one call, over experts
  stacked (E, H, D) per layer and read in place, with small_m_linear's tile (so its bits).

``kernel_isa`` says which build serves a kernel for a dtype here (bf16 on the avx512 build needs AVX512-BF16;
without it bf16 products go to the avx2 build), ``native_serves`` whether it serves a size. ``row_linear`` is
the fallback for single rows where no C++ kernel runs: convert-multiply-reduce compiled by Inductor.
``upcast_linear`` computes bf16 products of more rows (pre-fill) in fp32 where PyTorch has no fast bf16 matrix
product (no AVX512-BF16, no AMX: ``bf16_gemm_is_slow``). modules.py puts these kernels under a model's modules.
Building happens once per build (cached on disk by PyTorch across runs); a machine where building fails keeps
PyTorch's paths, with a warning. Measured rates: docs/performance.md.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _row_times_matrix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, K) times w (N, K) transposed -> (1, N), accumulated in fp32."""
    return (x.float()[:, None, :] * w.float()[None, :, :]).sum(-1).to(x.dtype)


CHUNK = 1024


def _row_times_matrix_chunked(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product for long rows (K a multiple of CHUNK): partial sums over chunks of K, then their sum.
    One long reduction per output streams long rows (Mistral's w2, K = 4 x dim) markedly slower than chunks do;
    short rows are as fast or faster without chunks (docs/performance.md)."""
    n = w.shape[0]
    return (x.float().view(1, 1, -1, CHUNK) * w.float().view(1, n, -1, CHUNK)).sum(-1).sum(-1).to(x.dtype)


def _chunked(k: int) -> bool:
    return k > 4 * CHUNK and k % CHUNK == 0


_compiled: dict[bool, Callable] = {}
_failed = False


def row_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for a single row x (1, K), through the compiled kernel when it works."""
    global _failed
    if not _failed:
        try:
            chunked = _chunked(w.shape[1])
            if chunked not in _compiled:
                _compiled[chunked] = torch.compile(_row_times_matrix_chunked if chunked else _row_times_matrix,
                                                   dynamic=True)
            return _compiled[chunked](x, w)
        except Exception as e:          # no C++ compiler, unsupported platform: keep working, say why once
            _failed = True
            log.warning("compiled decode kernel unavailable (%s: %s); using F.linear", type(e).__name__, e)
    return F.linear(x, w)


SMALL_M = 8                 # the native kernel's largest row count


# The C++ kernels are built once per instruction set, from the same sources (simd.h first: the vectors
# decode_attention.cpp and norm_rope.cpp are written in; moe_experts.cpp after small_m_linear.cpp, whose tile it
# uses, and moe_plan.h, shared with the quantized backend): "avx512" (AVX-512F/BW, and AVX512-BF16 for bf16
# products) and "avx2" (AVX2 + FMA + F16C, SIROCCO_AVX2 defined). Each build lists its sources and functions.
CSRC = Path(__file__).parent / "csrc"
SHARED_CSRC = Path(__file__).parents[1] / "csrc"         # C++ shared by the backends (moe_plan.h)
SOURCES = (CSRC / "simd.h", CSRC / "small_m_linear.cpp", CSRC / "decode_attention.cpp", CSRC / "norm_rope.cpp",
           SHARED_CSRC / "moe_plan.h", CSRC / "moe_experts.cpp")
FUNCTIONS = ("small_m_linear", "small_m_linear_isa", "decode_scores", "decode_values", "decode_scores_at",
             "decode_values_at", "rms_norm", "rope", "moe_experts")
BUILDS: dict[str, dict] = {
    "avx512": dict(name="sirocco_decode_kernels", sources=SOURCES, functions=FUNCTIONS,
                   cflags=("-mavx512f", "-mavx512bw", "-mavx512bf16")),
    "avx2": dict(name="sirocco_decode_kernels_avx2", sources=SOURCES, functions=FUNCTIONS,
                 cflags=("-mavx2", "-mfma", "-mf16c", "-DSIROCCO_AVX2")),
}

_modules: dict[str, object] = {}
_build_failed: set[str] = set()


def cpu_isas() -> tuple[str, ...]:
    """The builds this CPU runs, best first (PyTorch's own reading of the CPU: AVX-512 implies AVX2)."""
    return {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}.get(torch.backends.cpu.get_cpu_capability(), ())


def native_module(isa: str | None = None) -> Any:
    """The C++ kernels of csrc/ built for ``isa`` ("avx512" or "avx2"; by default the best this CPU runs), built
    on first use; None where the CPU cannot run that build or building fails (said once in the log). Which
    functions a build holds: ``BUILDS``."""
    isas = cpu_isas()
    if isa is None:
        if not isas:
            if "none" not in _build_failed:
                _build_failed.add("none")
                log.info("neither AVX2 nor AVX-512 on this CPU: the C++ decode kernels are not used")
            return None
        isa = isas[0]
    if isa not in BUILDS:
        raise ValueError(f"unknown kernel build {isa!r}; choose one of {tuple(BUILDS)}")
    if isa in _modules or isa in _build_failed:
        return _modules.get(isa)
    if isa not in isas:
        _build_failed.add(isa)
        log.info("this CPU cannot run the %s decode kernels", isa)
        return None
    build = BUILDS[isa]
    try:
        from torch.utils.cpp_extension import load_inline
        sources = [path.read_text() for path in build["sources"]]
        # The name carries a digest of the sources: PyTorch's build cache is one folder per name, shared by every
        # process of the user, so two versions of the sources built at once would otherwise overwrite each other.
        digest = hashlib.sha1("\0".join(sources + list(build["cflags"])).encode()).hexdigest()[:12]
        t0 = time.perf_counter()
        log.info("preparing the C++ decode kernels for %s (a build of about half a minute the first time, then "
                 "cached by PyTorch)", isa)
        _modules[isa] = load_inline(
            f"{build['name']}_{digest}", cpp_sources=sources, functions=list(build["functions"]),
            extra_cflags=["-O3", "-ffp-contract=off", *build["cflags"], "-fopenmp"], extra_ldflags=["-fopenmp"])
        log.info("C++ decode kernels (%s) ready in %.1f s", isa, time.perf_counter() - t0)
    except Exception as e:          # no compiler, no ninja, old compiler: keep working, say why once
        _build_failed.add(isa)
        log.warning("C++ decode kernels unavailable (%s: %s); using F.linear, the compiled row kernel, "
                    "matmul attention and PyTorch's norms", type(e).__name__,
                    str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None
    return _modules[isa]


@functools.cache
def _bf16_dot_product_supported() -> bool:
    """Whether the CPU has AVX512-BF16 (the avx512 build's bf16 products use its dot-product instruction)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


# What each build serves: kernel -> dtype -> the multiple the size must be (a linear layer's input size, a
# head_dim for attention and RoPE, a model dim for RMSNorm, the dim and the hidden size for moe): whole vectors
# (16 fp32 lanes, or 32 bf16 for the dpbf16 products; 8 lanes in the avx2 build), but the avx2 build's
# small_m_linear takes any K.
SERVES: dict[str, dict[str, dict[torch.dtype, int]]] = {
    "avx512": {"linear": {torch.bfloat16: 32, torch.float32: 16},
               "attention": {torch.bfloat16: 32, torch.float32: 16},
               "rms_norm": {torch.bfloat16: 16, torch.float32: 16},
               "rope": {torch.bfloat16: 16, torch.float32: 16},
               "moe": {torch.bfloat16: 32, torch.float32: 16}},
    "avx2": {"linear": {torch.bfloat16: 1, torch.float32: 1},
             "attention": {torch.bfloat16: 8, torch.float32: 8},
             "rms_norm": {torch.bfloat16: 8, torch.float32: 8},
             "rope": {torch.bfloat16: 8, torch.float32: 8},
             "moe": {torch.bfloat16: 8, torch.float32: 8}},
}
KERNELS = ("linear", "attention", "rms_norm", "rope", "moe")


def candidate_isas(dtype: torch.dtype, kernel: str = "linear") -> tuple[str, ...]:
    """The builds that could serve ``kernel`` for ``dtype`` on this CPU, best first: those the CPU runs that hold
    the kernel, bf16 on the avx512 build only with AVX512-BF16 (elsewhere the avx2 build: a shift makes bf16
    fp32)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    return tuple(isa for isa in cpu_isas() if dtype in SERVES[isa].get(kernel, {})
                 and not (isa == "avx512" and dtype == torch.bfloat16 and not _bf16_dot_product_supported()))


_chosen: dict[tuple[torch.dtype, str], str | None] = {}


def kernel_isa(dtype: torch.dtype, kernel: str = "linear") -> str | None:
    """The build that serves ``kernel`` for ``dtype`` here: the first of ``candidate_isas`` that builds (built on
    first use), or None. Decided once per (dtype, kernel): every layer asks at every step."""
    key = (dtype, kernel)
    if key not in _chosen:
        _chosen[key] = next((isa for isa in candidate_isas(dtype, kernel) if native_module(isa) is not None), None)
    return _chosen[key]


def native_for(dtype: torch.dtype, kernel: str = "linear") -> Any:
    """The built module whose ``kernel`` serves ``dtype`` here (see ``kernel_isa``), or None."""
    isa = kernel_isa(dtype, kernel)
    return None if isa is None else native_module(isa)


def native_kernel(dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``small_m_linear(x (M, K), w (N, K)) -> (M, N)`` from csrc/small_m_linear.cpp for ``dtype`` rows, or None
    (see above)."""
    module = native_for(dtype, "linear")
    return None if module is None else module.small_m_linear


def native_serves(dtype: torch.dtype, k: int, kernel: str = "linear") -> bool:
    """Whether the C++ ``kernel`` ("linear", "attention", "rms_norm", "rope") serves rows of this dtype and size
    (a linear layer's input size, a head_dim for attention and RoPE, a model dim for RMSNorm) on this machine."""
    isa = kernel_isa(dtype, kernel)
    return isa is not None and k % SERVES[isa][kernel][dtype] == 0


@functools.cache
def bf16_gemm_is_slow() -> bool:
    """Whether PyTorch lacks a fast bf16 matrix product on this CPU: an x86 CPU (AVX2 or AVX-512 as PyTorch reads
    it) with neither AVX512-BF16 nor AMX tiles (torch's own checks). There its bf16 products run several times
    slower than fp32 ones (docs/performance.md). Other CPUs (Arm's bf16 instructions) are left to PyTorch."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return not any(check is not None and check() for check in checks)


UPCAST_MIN_ROWS = 4         # from 4 rows on, the fp32 product with the weight upcast beats bf16 F.linear here
UPCAST_TILE_BYTES = 4 * 2**20


def upcast_pays(x: torch.Tensor) -> bool:
    """Whether ``upcast_linear`` should compute ``F.linear(x, w)`` for bf16 rows x (..., K) on this CPU: a slow
    bf16 product (``bf16_gemm_is_slow``), at least UPCAST_MIN_ROWS rows, no autograd."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1] > 0 and bf16_gemm_is_slow())


# Pre-fill products have as many rows as the step has tokens (a prompt's length, a chunk, or the tokens a MoE layer
# routed to one expert), and the matrix library (oneDNN) compiles a kernel for every new (rows, N, K) and keeps it in
# memory. Rows rounded up to a multiple of 32 (zero rows appended, their outputs dropped) bound how many there are:
# varied prompts pre-fill faster and the process stays smaller (docs/performance.md, "Pre-fill row counts").
ROW_BUCKET = 32


def bucketed_linear(x: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``linear(x)`` for x (M, K) with M rounded up to a multiple of ROW_BUCKET by zero rows, whose outputs are
    dropped: (M, N). Each output row is its row's product (the zero rows only change which kernel the library
    picks, as M itself does). Without autograd only; M below ROW_BUCKET or already a multiple is passed as it is."""
    m = x.shape[0]
    pad = -m % ROW_BUCKET
    if x.dim() != 2 or m < ROW_BUCKET or not pad or torch.is_grad_enabled():
        return linear(x)
    return linear(torch.cat([x, x.new_zeros(pad, x.shape[1])]))[:m]


def upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for bf16 x (..., K) and w (N, K) as an fp32 product rounded to bf16 once: the weight is
    upcast a tile of output rows at a time (about UPCAST_TILE_BYTES of fp32, one buffer reused, so the upcast
    copy stays in cache and no fresh pages are faulted in per call), each tile's product written to its columns."""
    k = x.shape[-1]
    n = w.shape[0]
    xf = x.reshape(-1, k).float()
    out = torch.empty(xf.shape[0], n, dtype=x.dtype, device=x.device)
    rows = max(16, UPCAST_TILE_BYTES // (4 * k))
    buf = torch.empty(min(rows, n), k, dtype=torch.float32, device=x.device)
    for n0 in range(0, n, rows):
        nt = min(rows, n - n0)
        out[:, n0:n0 + nt] = xf @ buf[:nt].copy_(w[n0:n0 + nt]).T
    return out.view(*x.shape[:-1], n)
