"""A model's modules on the CPU kernels of kernels.py, for inference.

``use_fast_decode(model)`` changes the class of some modules in place (parameters, names and state dicts do
not change, and model.py stays plain); each new class takes its kernel only where it serves (CPU, no autograd,
a served dtype and size) and otherwise does exactly what the model's class does:

    nn.Linear (no bias)   -> DecodeLinear      products of 1 to 8 rows (decode steps)
    model.RMSNorm         -> FastRMSNorm       RMSNorm in one pass (every step, pre-fill included)
    model.Attention       -> FastAttention     RoPE in one pass (every step)

Training keeps autograd on, so it never reaches these kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Attention, RMSNorm, apply_rope


def _served(x: torch.Tensor, dtype: torch.dtype, size: int) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == dtype
            and kernels.native_serves(dtype, size))


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose products of 1 to 8 rows on CPU, without autograd, use the kernels of
    kernels.py: ``small_m_linear`` where it serves the dtype, else ``row_linear`` for a single row, else
    ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and 0 < x.shape[0] <= kernels.SMALL_M and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            if kernels.native_serves(x.dtype, x.shape[1]) and self.weight.is_contiguous():
                return kernels.native_kernel()(x.contiguous(), self.weight)
            if x.shape[0] == 1:
                return kernels.row_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class FastRMSNorm(RMSNorm):
    """``RMSNorm`` through the ``rms_norm`` kernel for (T, dim) inputs: the same roundings, the sum of squares
    in another order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and _served(x, self.weight.dtype, x.shape[1]):
            return kernels.native_module().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastAttention(Attention):
    """``Attention`` whose RoPE runs through the ``rope`` kernel: the same bits as ``apply_rope``."""

    def rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if _served(x, x.dtype, x.shape[-1]):
            return kernels.native_module().rope(x, *rope)
        return apply_rope(x, *rope)


def use_fast_decode(model: nn.Module) -> int:
    """Put the model's modules on the kernels (see the module's docstring); returns how many modules changed."""
    swaps = {nn.Linear: DecodeLinear, RMSNorm: FastRMSNorm, Attention: FastAttention}
    n = 0
    for module in model.modules():
        new = swaps.get(type(module))
        if new is not None and getattr(module, "bias", None) is None:
            module.__class__ = new
            n += 1
    return n


def fast_decode_pays(model: nn.Module, min_bytes: int = 256 * 2**20) -> bool:
    """Whether the build (once, about half a minute) is worth it: on CPU, for weights large enough that decode is
    memory-bound."""
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
            if device.type == "cpu" and kernels.native_serves(dtype, k):
                native += 1
            else:
                kernels.row_linear(torch.zeros(1, k, dtype=dtype, device=device),
                                   torch.zeros(n, k, dtype=dtype, device=device))
                compiled.add((n, k))
    norms = any(isinstance(m, FastRMSNorm) and m.weight.device.type == "cpu"
                and kernels.native_serves(m.weight.dtype, m.weight.shape[0]) for m in model.modules())
    parts = ([f"small-row kernel for {native} weight shapes"] if native else []) + \
            ([f"compiled row kernel for {len(compiled)} weight shapes"] if compiled else []) + \
            (["one-pass RMSNorm and RoPE"] if norms else [])
    return ", ".join(parts) or "no weight shapes"
