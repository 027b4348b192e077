"""The reference backend: the model's own plain-PyTorch modules and ``AttentionOps``.

Attaching it (the first step of the conversion pass, conversion.py) undoes any other backend (a replaced
module's ``reference()`` gives back the ``nn.Linear`` or ``RMSNorm`` it replaced, holding the same parameters)
and chooses the pre-fill attention path. The helpers here are the pass's tools for every backend: replace
modules by new ones, hand attention layers their ops.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..model import Attention
from ..model.attention import AttentionOps, Prefill
from .moe import clear_float_kernels


def replace_modules(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule ``m`` for which ``make(m)`` gives a module (it should hold ``m``'s parameters
    under the same names, so the state dict does not change); returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, name, new)
                n += 1
    return n


def set_attention_ops(model: nn.Module, ops: AttentionOps) -> None:
    """Hand every attention layer of ``model`` the same ops."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.ops = ops


def _reference_of(m: nn.Module) -> nn.Module | None:
    """The plain module a backend's replacement stands for (its ``reference()``), None for any other module."""
    reference = getattr(m, "reference", None)
    return reference() if callable(reference) else None


def attach(model: nn.Module, prefill: Prefill = "per_sequence") -> int:
    """Put the model back on its reference modules, with the given pre-fill attention path; returns how many
    modules were replaced."""
    n = replace_modules(model, _reference_of)
    set_attention_ops(model, AttentionOps(prefill))
    clear_float_kernels(model)
    return n
