"""A MoE layer's experts stored stacked, and its decode step in one kernel call.

``stack_experts(model, ...)`` gives every ``MoeFeedForward`` of the model one tensor per expert matrix:

    float experts (nn.Linear / CpuLinear)   w1, w3 (E, H, D), w2 (E, D, H) in the weights' dtype
    quantized experts (QuantLinear)          w1, w3 (E, H, D // values * bytes), w2 (E, D, H // values * bytes)
                                             uint8 GGUF blocks, one format per layer

and makes each expert's own parameter (or ``qweight`` buffer) a view of its row of the stack, so state-dict names
and the plain per-expert path keep working. Tensors already laid out that way (a GGUF file's ``ffn_*_exps``, whose
experts the loader hands out as views of the memory-mapped tensor, or a layer stacked before) are taken as they
are: no copy. Worked example: E = 8 experts of (H, D) = (3584, 1024) bf16, expert e's w1 at storage element
e * 3584 * 1024 of one storage -> stack = as_strided(size (8, 3584, 1024), stride (3584 * 1024, 1024, 1)).

The layer's ``experts_kernel`` is then a ``StackedExperts``: for a decode step (CPU, no autograd, 1 to
``MAX_TOKENS`` tokens, a served dtype and size) it runs all the chosen experts in one call, ``moe_experts``
(cpu/csrc/moe_experts.cpp) or ``qmoe`` (quant/csrc/qmoe.cpp), reading each chosen expert's rows in place; it
returns None otherwise and the layer runs its experts one by one. The route (router, top-k, softmax) stays in
the model. A layer's quantized experts are in one layout, each expert's rows interleaved by themselves where they
are (quant/interleave.py), so the stack is read in place either way. The float kernel is the CPU backend's
(installed by its attach, cleared by the reference backend's); the quantized one comes with the quantized weights
(the conversion pass's step for them, conversion.py, whether they were quantized at load or read from a GGUF file).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from ..model.transformer import MoeFeedForward

MAX_TOKENS = 8              # the kernels' largest row count per expert; past it the per-expert path (pre-fill)
MATRICES = ("w1", "w3", "w2")


def expert_groups(model: nn.Module) -> list[list[str]]:
    """Module paths of the experts that share one stack: per MoE layer and matrix, its E experts' linear layers
    (``layers.0.feed_forward.experts.{0..E-1}.w1``), in stacking order."""
    return [[f"{path}.experts.{e}.{matrix}" for e in range(len(m.experts))]
            for path, m in model.named_modules() if isinstance(m, MoeFeedForward) for matrix in MATRICES]


def stack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """One (E, *shape) tensor holding ``tensors`` (E tensors of one shape and dtype): a view of their storage when
    they already sit in one storage at equal spacing, each contiguous (returns (view, False)), else a new tensor
    they are copied into (returns (stacked, True))."""
    first = tensors[0]
    shape, dtype = first.shape, first.dtype
    same = all(t.shape == shape and t.dtype == dtype and t.device == first.device and t.is_contiguous()
               for t in tensors)
    if same and len(tensors) > 1:
        storage = first.untyped_storage().data_ptr()
        offsets = [t.storage_offset() for t in tensors]
        step = offsets[1] - offsets[0]
        if (step >= first.numel() and all(t.untyped_storage().data_ptr() == storage for t in tensors)
                and all(b - a == step for a, b in pairwise(offsets))):
            view = first.as_strided((len(tensors), *shape), (step, *first.stride()), offsets[0])
            return view, False
    if same and len(tensors) == 1:
        return first.unsqueeze(0), False
    return torch.stack([t.detach() for t in tensors]), True


class StackedExperts:
    """A MoE layer's experts as three stacks (see the module docstring): ``fmt`` None for float weights, else
    the blocks' type ("q8_0", "q4_K", ...); ``__call__(x, chosen, weights)`` is the layer's experts for a decode
    step, or None where the kernel does not serve."""

    def __init__(self, moe: MoeFeedForward, fmt: str | None, stacks: tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]):
        self.fmt = fmt
        self.w1, self.w3, self.w2 = stacks
        self.dim = int(self.w2.shape[1])
        self.hidden = int(self.w1.shape[1])
        self._probe = moe.experts[0].get_submodule("w1")   # whose weight must still be the stack's row 0 (not moved)

    def _in_place(self) -> bool:
        held = getattr(self._probe, "qweight" if self.fmt is not None else "weight")
        return held.data_ptr() == self.w1.data_ptr() and held.device == self.w1.device

    def __call__(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        if (x.dim() != 2 or not 1 <= x.shape[0] <= MAX_TOKENS or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dtype not in (torch.float32, torch.bfloat16) or not self._in_place()):
            return None
        if self.fmt is None:
            from .cpu import kernels
            if (self.w1.dtype != x.dtype or not kernels.native_serves(x.dtype, self.dim, "moe")
                    or not kernels.native_serves(x.dtype, self.hidden, "moe")):
                return None
            return kernels.native_for(x.dtype, "moe").moe_experts(x, chosen, weights, self.w1, self.w3, self.w2)
        from .quant import kernels as qkernels
        return qkernels.qmoe(x, chosen, weights, self.w1, self.w3, self.w2, self.fmt,
                             layout=str(getattr(self._probe, "layout", "file")))


def _expert_kind(moe: MoeFeedForward) -> str | None:
    """"float" when every expert matrix has a plain ``weight``, the format when all are QuantLinear of one format
    and one layout (quant/interleave.py), None for anything else (mixed, biased)."""
    from .quant.linear import QuantLinear
    linears = [getattr(e, name) for e in moe.experts for name in MATRICES]
    if all(isinstance(m, QuantLinear) and m.bias is None for m in linears):
        fmts, layouts = {m.fmt for m in linears}, {m.layout for m in linears}
        return fmts.pop() if len(fmts) == 1 and len(layouts) == 1 else None
    if all(not isinstance(m, QuantLinear) and isinstance(getattr(m, "weight", None), torch.Tensor)
           and getattr(m, "bias", None) is None for m in linears):
        return "float"
    return None


def stack_layer(moe: MoeFeedForward) -> StackedExperts | None:
    """Stack one layer's experts (copying only what is not laid out already) and point each expert's parameter or
    buffer at its row; returns the stacks, or None where the experts are of mixed kinds."""
    kind = _expert_kind(moe)
    if kind is None:
        return None
    stacks = []
    with torch.no_grad():
        for name in MATRICES:
            linears = [getattr(e, name) for e in moe.experts]
            held = [m.qweight if kind != "float" else m.weight for m in linears]
            stacked, copied = stack(held)
            if copied:
                for e, m in enumerate(linears):
                    if kind == "float":
                        m.weight = nn.Parameter(stacked[e], requires_grad=m.weight.requires_grad)
                    else:
                        m.qweight = stacked[e]
            stacks.append(stacked)
    return StackedExperts(moe, None if kind == "float" else kind, (stacks[0], stacks[1], stacks[2]))


def stack_experts(model: nn.Module, quantized: bool) -> int:
    """Stack every MoE layer's experts of one kind (``quantized``: QuantLinear experts, else float ones) and give
    the layer its one-call decode kernel; returns how many layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, MoeFeedForward) and (_expert_kind(m) not in (None, "float")) == quantized:
            kernel = stack_layer(m)
            if kernel is not None:
                m.experts_kernel = kernel
                n += 1
    return n


def clear_float_kernels(model: nn.Module) -> None:
    """Take the float experts' kernel off every MoE layer (the reference backend); quantized layers keep theirs."""
    for m in model.modules():
        kernel = getattr(m, "experts_kernel", None)
        if isinstance(m, MoeFeedForward) and isinstance(kernel, StackedExperts) and kernel.fmt is None:
            m.experts_kernel = None
