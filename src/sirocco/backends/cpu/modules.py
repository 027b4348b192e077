"""The model's modules and attention ops on the CPU kernels of kernels.py, for inference.

``attach(model)`` replaces modules by new ones that hold the same parameters (names and state dicts do not
change), and hands every attention layer ``CpuAttentionOps``. Each takes its kernel only where it serves
(CPU, no autograd, a served dtype and size) and otherwise computes exactly what the reference does:

    nn.Linear (no bias)   -> CpuLinear          products of 1 to 8 rows (decode steps); bf16 pre-fill in fp32
                                                where PyTorch's bf16 product is slow
    model.RMSNorm         -> CpuRMSNorm         RMSNorm in one pass (every step, pre-fill included)
    attention ops         -> CpuAttentionOps    RoPE in one pass, decode attention on the bf16 cache in place
    MoE experts           -> stacked (E, H, D)  one ``moe_experts`` call per MoE layer in decode (backends/moe.py)

Training keeps autograd on, so it never reaches these kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...model import RMSNorm
from ...model.attention import AttentionOps, Prefill, decode_attention
from ...model.rope import apply_rope
from ..moe import stack_experts
from ..reference import replace_modules, set_attention_ops
from . import kernels


def _served(x: torch.Tensor, dtype: torch.dtype, size: int, kernel: str) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == dtype
            and kernels.native_serves(dtype, size, kernel))


class CpuLinear(nn.Module):
    """A bias-free linear layer whose products of 1 to 8 rows on CPU, without autograd, use ``small_m_linear``
    where it serves the dtype, else ``row_linear`` for a single row; bf16 products of more rows (pre-fill) run
    in fp32 through ``upcast_linear`` where PyTorch's bf16 product is slow (``upcast_pays``); else ``F.linear``,
    its rows rounded up to a multiple of 32 (``bucketed_linear``)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and 0 < x.shape[0] <= kernels.SMALL_M and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            native = kernels.native_kernel(x.dtype) if kernels.native_serves(x.dtype, x.shape[1]) else None
            if native is not None and self.weight.is_contiguous():
                return native(x.contiguous(), self.weight)
            if x.shape[0] == 1:
                return kernels.row_linear(x, self.weight)
        if kernels.upcast_pays(x):
            return kernels.upcast_linear(x, self.weight)
        return kernels.bucketed_linear(x, lambda rows: F.linear(rows, self.weight))

    def reference(self) -> nn.Linear:
        """The plain ``nn.Linear`` this module replaced, holding the same weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CpuRMSNorm(RMSNorm):
    """``RMSNorm`` through the ``rms_norm`` kernel for (T, dim) inputs: the same roundings, the sum of squares
    in another order."""

    @classmethod
    def of(cls, norm: RMSNorm) -> CpuRMSNorm:
        new = cls(norm.weight.shape[0], norm.eps)
        new.weight = norm.weight
        return new

    def reference(self) -> RMSNorm:
        """The plain ``RMSNorm`` this module replaced, holding the same weight."""
        norm = RMSNorm(self.weight.shape[0], self.eps)
        norm.weight = self.weight
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and _served(x, self.weight.dtype, x.shape[1], "rms_norm"):
            return kernels.native_for(x.dtype, "rms_norm").rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class CpuAttentionOps(AttentionOps):
    """RoPE through the ``rope`` kernel (the same bits as ``apply_rope``), decode attention through
    ``decode_scores`` / ``decode_values`` (fp32 scores from the cache in place, masked slots skipped), or their
    ``_at`` forms over the whole cache through the plan's row and slot maps. A decode query's bits are those it gets
    alone: not those of the other queries of the step (``decode_softmax``), nor of a ring larger than the window."""

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if _served(x, x.dtype, x.shape[-1], "rope"):
            return kernels.native_for(x.dtype, "rope").rope(x, cos, sin)
        return apply_rope(x, cos, sin)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
               fill: Sequence[int] | None = None) -> torch.Tensor:
        if _served(q, q.dtype, q.shape[-1], "attention"):
            return native_decode_attention(q, k, v, valid, fill=fill)
        return decode_attention(q, k, v, valid)

    def decode_at(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                  valid: torch.Tensor, fill: Sequence[int] | None = None) -> torch.Tensor:
        if _served(q, q.dtype, q.shape[-1], "attention"):
            native = kernels.native_for(q.dtype, "attention")
            scores = native.decode_scores_at(q.contiguous(), k, rows, slots, valid.contiguous(),
                                             1.0 / math.sqrt(q.shape[-1]))                           # (B, H, L)
            return native.decode_values_at(decode_softmax(scores, fill), v, rows, slots)
        return super().decode_at(q, k, v, rows, slots, valid, fill)


def softmax_lanes() -> int:
    """fp32 lanes of PyTorch's vectorized softmax on this CPU (its ``Vectorized<float>::size()``)."""
    return 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8


def decode_softmax(scores: torch.Tensor, fill: Sequence[int] | None = None) -> torch.Tensor:
    """``softmax(scores, -1)`` for (B, H, L) fp32 decode scores whose query b has its ``fill[b]`` valid keys first
    (the rest -inf), with each query's bits those of a softmax over its own keys alone.

    PyTorch's softmax over the last dimension sums lanes of a vector for a row of at least ``softmax_lanes()``
    values and one value after the other for a shorter row, and padding with -inf (probability 0) keeps the bits
    within each of the two regimes but not across them. A step pads every query to its longest one, so a query
    with fewer valid keys than a vector, beside a longer one, gets its softmax computed again over a row shorter
    than a vector: the bits it has in a step of its own, whatever shares its step (and whatever the draft length
    that makes its step longer). Without ``fill`` it is the plain softmax."""
    probs = torch.softmax(scores, dim=-1)
    lanes = softmax_lanes()
    if fill is None or scores.shape[-1] < lanes:
        return probs
    short = [b for b, n in enumerate(fill) if n < lanes]
    if short:
        idx = torch.tensor(short, device=scores.device)
        probs[idx] = F.pad(torch.softmax(scores[idx, :, :lanes - 1], dim=-1), (0, scores.shape[-1] - lanes + 1))
    return probs


def native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                            native: Any = None, fill: Sequence[int] | None = None) -> torch.Tensor:
    """``decode_attention`` through the C++ kernels: fp32 scores (-inf on invalid slots), fp32 softmax
    (``decode_softmax``), and the probabilities times the values accumulated in fp32. q (B, H, D); k/v (B, G, L, D);
    valid (B, L); ``fill``: each query's count of valid keys, which are its first ones. ``native``: the build to use
    (default: the one serving q's dtype here)."""
    native = native if native is not None else kernels.native_for(q.dtype, "attention")
    scores = native.decode_scores(q.contiguous(), k, valid.contiguous(), 1.0 / math.sqrt(q.shape[-1]))  # (B, H, L)
    return native.decode_values(decode_softmax(scores, fill), v)


def attach(model: nn.Module, prefill: Prefill = "per_sequence") -> int:
    """Put the model on the kernels (see the module's docstring); returns how many modules were replaced."""
    n = replace_modules(model, lambda m: CpuLinear(m.weight) if type(m) is nn.Linear and m.bias is None else
                        CpuRMSNorm.of(m) if type(m) is RMSNorm else None)
    set_attention_ops(model, CpuAttentionOps(prefill))
    stack_experts(model, quantized=False)
    return n


def pays(model: nn.Module, min_bytes: int = 256 * 2**20) -> bool:
    """Whether the build (once, about half a minute) is worth it: on CPU, for weights (parameters and buffers) large
    enough that decode is memory-bound."""
    params = list(model.parameters())
    tensors = params + list(model.buffers())          # quantized weights are buffers (QuantLinear.qweight)
    return (params[0].device.type == "cpu"
            and sum(t.numel() * t.element_size() for t in tensors) >= min_bytes)


def warm_up(model: nn.Module) -> str:
    """Build the kernels the model's decode will use now, so that nothing is compiled inside the decode loop:
    the native kernel once, or the compiled row kernel for every weight shape (Inductor specialises on some
    size relations, so each distinct shape gets its own graph). Returns what was prepared, for the log."""
    shapes = {(m.weight.shape, m.weight.dtype, m.weight.device) for m in model.modules() if isinstance(m, CpuLinear)}
    native, isas, compiled = 0, set(), set()
    with torch.no_grad():
        for (n, k), dtype, device in shapes:
            if device.type == "cpu" and kernels.native_serves(dtype, k):
                native += 1
                isas.add(str(kernels.kernel_isa(dtype)))
            else:
                kernels.row_linear(torch.zeros(1, k, dtype=dtype, device=device),
                                   torch.zeros(n, k, dtype=dtype, device=device))
                compiled.add((n, k))
    norms = any(isinstance(m, CpuRMSNorm) and m.weight.device.type == "cpu"
                and kernels.native_serves(m.weight.dtype, m.weight.shape[0], "rms_norm") for m in model.modules())
    parts = ([f"small-row kernel ({', '.join(sorted(isas))}) for {native} weight shapes"] if native else []) + \
            ([f"compiled row kernel for {len(compiled)} weight shapes"] if compiled else []) + \
            (["one-pass RMSNorm and RoPE"] if norms else [])
    return ", ".join(parts) or "no weight shapes"


def row_exact_reason(model: nn.Module) -> str | None:
    """Why a step of 1 to ``kernels.SMALL_M`` tokens on ``model`` may give a token other bits than a step of that
    token alone, or None where it may not: every linear layer runs a small-row kernel (``small_m_linear``, or the
    quantized ``qlinear``), every RMSNorm the ``rms_norm`` kernel and every attention layer ``CpuAttentionOps``
    with its kernels served (speculative decoding needs this: generate/speculation.py)."""
    from ...model import Attention
    from ..quant import kernels as qkernels
    from ..quant.linear import QuantLinear

    first = next(p for p in model.parameters() if p.is_floating_point())
    if first.device.type != "cpu":
        return "the model is not on the CPU"
    dtype = first.dtype                         # the activations' (quantized layers keep only blocks)
    for name, m in model.named_modules():
        if isinstance(m, CpuLinear):
            if not (m.weight.is_contiguous() and kernels.native_serves(m.weight.dtype, m.in_features)):
                return f"{name}: no small-row kernel for {m.weight.dtype} rows of {m.in_features} values here"
        elif isinstance(m, QuantLinear):
            if qkernels.native_module() is None:
                return "the quantized decode kernels are not built on this machine"
        elif isinstance(m, nn.Linear):
            return f"{name} is a plain nn.Linear, whose rounding depends on how many rows it multiplies"
        elif isinstance(m, RMSNorm):
            if not (isinstance(m, CpuRMSNorm) and kernels.native_serves(m.weight.dtype, m.weight.shape[0],
                                                                        "rms_norm")):
                return f"{name}: no one-pass RMSNorm kernel for it here"
        elif isinstance(m, Attention):      # noqa: SIM102 -- one branch per module kind, its check inside, as above
            if not (isinstance(m.ops, CpuAttentionOps) and kernels.native_serves(dtype, m.head_dim, "attention")
                    and kernels.native_serves(dtype, m.head_dim, "rope")):
                return f"{name}: no decode attention kernel for {dtype} heads of {m.head_dim} here"
    return None
