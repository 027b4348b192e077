"""Faster kernels for the products that dominate decode on CPU: a few rows times a weight matrix.

A decode step reads every weight once and multiplies it by one row per running sequence. On this class of CPU
(AVX-512 with AVX512-BF16, no AMX) ``F.linear`` streams bf16 weights at about 17-19 GB/s for one row and about
16-20 GB/s for two to eight, well under what the machine can read. Two kernels do better, with fp32 accumulation
and the weights left where they are (no second copy, no new layout):

- ``small_m_linear`` (csrc/small_m_linear.cpp, built at run time by torch.utils.cpp_extension): 1 to 8 rows,
  bf16 or fp32, on CPUs with AVX-512 (and AVX512-BF16 for bf16). Measured with 2 threads on a 1B model in
  bf16: a 1-row step 60-75 ms instead of 75-105, an 8-row step 93 ms instead of 145-165. Each output's bits
  do not depend on how many rows are multiplied at once, so a prompt decodes the same alone or packed.
- ``row_linear``: one row, written as convert-multiply-reduce and compiled by Inductor (about 30 GB/s against
  F.linear's 18 for bf16); used for single rows where the first kernel cannot run (AVX2-only CPUs, or bf16
  without AVX512-BF16).

The swap is a module swap (``use_fast_decode(model)``): parameters, names and state dicts do not change, and
the model file stays plain. Building either kernel takes seconds once (cached on disk by PyTorch across runs);
a machine where building fails falls back to ``F.linear`` with a warning.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _row_times_matrix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, K) times w (N, K) transposed -> (1, N), accumulated in fp32."""
    return (x.float()[:, None, :] * w.float()[None, :, :]).sum(-1).to(x.dtype)


CHUNK = 1024


def _row_times_matrix_chunked(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product for long rows (K a multiple of CHUNK): partial sums over chunks of K, then their sum.
    One long reduction per output streamed the weights of Mistral's w2 (K = 4 x dim) at about 19 GB/s
    against about 28 GB/s in chunks; short rows are as fast or faster without chunks."""
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
NATIVE_SOURCES = ("small_m_linear.cpp", "decode_attention.cpp")
NATIVE_FUNCTIONS = ("small_m_linear", "decode_scores", "decode_values")


def native_module():
    """The C++ kernels of csrc/ (``small_m_linear``, ``decode_scores``, ``decode_values``), built on first use;
    None where the CPU lacks AVX-512 or building fails (said once in the log)."""
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
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"],
                extra_ldflags=["-fopenmp"])
            log.info("C++ decode kernels ready in %.1f s", time.perf_counter() - t0)
        except Exception as e:          # no compiler, no ninja, old compiler: keep working, say why once
            _native_failed = True
            log.warning("C++ decode kernels unavailable (%s: %s); using F.linear, the compiled row kernel and "
                        "matmul attention", type(e).__name__,
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
    """Whether the C++ kernels can multiply rows of this dtype and length (a linear layer's input size, or a
    head_dim for decode attention) on this machine."""
    if dtype == torch.bfloat16:
        return k % 32 == 0 and _bf16_dot_product_supported() and native_module() is not None
    if dtype == torch.float32:
        return k % 16 == 0 and native_module() is not None
    return False


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose products of 1 to 8 rows on CPU, without autograd, use the kernels above:
    ``small_m_linear`` where it serves the dtype, else ``row_linear`` for a single row, else ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 0 < x.shape[0] <= SMALL_M and x.device.type == "cpu" and not torch.is_grad_enabled():
            if native_serves(x.dtype, x.shape[1]) and self.weight.is_contiguous():
                return native_kernel()(x.contiguous(), self.weight)
            if x.shape[0] == 1:
                return row_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def use_fast_decode(model: nn.Module) -> int:
    """Route the model's small-row linear products (decode steps) to the kernels above; returns how many modules
    changed."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = DecodeLinear
            n += 1
    return n


def fast_decode_pays(model: nn.Module, min_bytes: int = 256 * 2**20) -> bool:
    """Whether the compile (seconds) is worth it: on CPU, for weights large enough that decode is memory-bound."""
    params = list(model.parameters())
    return (params[0].device.type == "cpu"
            and sum(p.numel() * p.element_size() for p in params) >= min_bytes)


def warm_up(model: nn.Module) -> str:
    """Build the kernels the model's decode will use now, so that nothing is compiled inside the decode loop:
    the native kernel once, or the compiled row kernel for every weight shape (Inductor specialises on some
    size relations, so each distinct shape gets its own graph). Returns what was prepared, for the log."""
    shapes = {(m.weight.shape, m.weight.dtype, m.weight.device) for m in model.modules()
              if isinstance(m, DecodeLinear)}
    native, compiled = 0, set()
    with torch.no_grad():
        for (n, k), dtype, device in shapes:
            if device.type == "cpu" and native_serves(dtype, k):
                native += 1
            else:
                row_linear(torch.zeros(1, k, dtype=dtype, device=device), torch.zeros(n, k, dtype=dtype, device=device))
                compiled.add((n, k))
    parts = ([f"small-row kernel for {native} weight shapes"] if native else []) + \
            ([f"compiled row kernel for {len(compiled)} weight shapes"] if compiled else [])
    return " and ".join(parts) or "no weight shapes"
