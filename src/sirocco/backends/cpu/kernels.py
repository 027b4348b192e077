"""CPU kernels for what dominates inference once the big matrix products are done well: decode steps.

A decode step reads every weight once and multiplies it by one row per running sequence; ``F.linear`` streams
weights well below the machine's read rate for one to eight rows, and each small operation of the step (norms,
rotations) costs microseconds whatever its size. The C++ sources of csrc/, built at run time by
torch.utils.cpp_extension on CPUs with AVX-512:

- ``small_m_linear`` (small_m_linear.cpp): 1 to 8 rows times a weight matrix, bf16 or fp32, fp32 sums, weights
  read where they are (no second copy, no new layout). Each output's bits do not depend on how many rows are
  multiplied at once, so a prompt decodes the same alone or packed.
- ``decode_scores`` / ``decode_values`` (decode_attention.cpp): one query per sequence over its cache row.
- ``rms_norm`` / ``rope`` (norm_rope.cpp): RMSNorm and RoPE in one pass each, rounded as the model rounds.

``row_linear`` is the fallback for single rows where the C++ kernels cannot run (AVX2-only CPUs, or bf16 without
AVX512-BF16): convert-multiply-reduce compiled by Inductor. modules.py puts these kernels under a model's
modules. Building happens once (cached on disk by PyTorch across runs); a machine where building fails keeps
PyTorch's paths, with a warning. Measured rates: docs/performance.md.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, Optional

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


_native_module = None
_native_failed = False
NATIVE_SOURCES = ("small_m_linear.cpp", "decode_attention.cpp", "norm_rope.cpp")
NATIVE_FUNCTIONS = ("small_m_linear", "decode_scores", "decode_values", "rms_norm", "rope")


def native_module():
    """The C++ kernels of csrc/ (``small_m_linear``, ``decode_scores``, ``decode_values``, ``rms_norm``, ``rope``),
    built on first use; None where the CPU lacks AVX-512 or building fails (said once in the log)."""
    global _native_module, _native_failed
    if _native_module is None and not _native_failed:
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            _native_failed = True
            log.info("no AVX-512 on this CPU: the C++ decode kernels are not used")
            return None
        try:
            from torch.utils.cpp_extension import load_inline
            sources = [(Path(__file__).parent / "csrc" / name).read_text() for name in NATIVE_SOURCES]
            t0 = time.perf_counter()
            log.info("preparing the C++ decode kernels (a build of about half a minute the first time, then cached "
                     "by PyTorch)")
            _native_module = load_inline(
                "sirocco_decode_kernels", cpp_sources=sources, functions=list(NATIVE_FUNCTIONS),
                extra_cflags=["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"],
                extra_ldflags=["-fopenmp"])
            log.info("C++ decode kernels ready in %.1f s", time.perf_counter() - t0)
        except Exception as e:          # no compiler, no ninja, old compiler: keep working, say why once
            _native_failed = True
            log.warning("C++ decode kernels unavailable (%s: %s); using F.linear, the compiled row kernel, "
                        "matmul attention and PyTorch's norms", type(e).__name__,
                        str(e).strip().splitlines()[-1] if str(e).strip() else "")
            return None
    return _native_module


def native_kernel() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``small_m_linear(x (M, K), w (N, K)) -> (M, N)`` from csrc/small_m_linear.cpp, or None (see above)."""
    module = native_module()
    return None if module is None else module.small_m_linear


@functools.lru_cache(maxsize=None)
def _bf16_dot_product_supported() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def native_serves(dtype: torch.dtype, k: int) -> bool:
    """Whether the C++ kernels serve rows of this dtype and length (a linear layer's input size, a head_dim for
    attention and RoPE, a model dim for RMSNorm) on this machine."""
    if dtype == torch.bfloat16:
        return k % 32 == 0 and _bf16_dot_product_supported() and native_module() is not None
    if dtype == torch.float32:
        return k % 16 == 0 and native_module() is not None
    return False
