"""A faster kernel for the one product that dominates batch-1 decode on CPU: one row times a weight matrix.

Decode at batch 1 is memory-bound: each step reads every weight once. On this class of CPU (AVX512-BF16, no
AMX) ``F.linear`` with one bf16 row streams weights at about 17-19 GB/s, half the machine's read bandwidth,
while the same product written as convert-multiply-reduce and compiled by Inductor streams at about 30-32 GB/s
with the same fp32 accumulation (measured with benchmarks/bench_kernels.py). For two or more rows
``F.linear`` is faster again, so only single-row products are routed to the compiled kernel.

The swap is a module swap (``use_fast_decode(model)``): parameters, names and state dicts do not change, and
the model file stays plain. Two compiles with dynamic shapes (short rows, and long rows summed in chunks) serve
every weight shape (a few seconds, cached on disk by Inductor across runs); a machine where compiling fails falls
back to ``F.linear`` with a warning.
"""

from __future__ import annotations

import logging
from typing import Callable

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


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose single-row products on CPU use ``row_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
            return row_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def use_fast_decode(model: nn.Module) -> int:
    """Route the model's single-row linear products to the compiled kernel; returns how many modules changed."""
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


def warm_up(model: nn.Module) -> int:
    """Compile the kernel for every weight shape now, so that no compile happens inside the decode loop
    (Inductor specialises on some size relations, so each distinct shape gets its own graph). Returns the
    number of distinct shapes."""
    shapes = {(m.weight.shape, m.weight.dtype, m.weight.device) for m in model.modules()
              if isinstance(m, DecodeLinear)}
    with torch.no_grad():
        for (n, k), dtype, device in shapes:
            row_linear(torch.zeros(1, k, dtype=dtype, device=device), torch.zeros(n, k, dtype=dtype, device=device))
    return len(shapes)
