"""Backends: how the model's products, norms, rotations and attention are computed.

The model (model/) is the definition in plain PyTorch; ``attach(model, name)`` is the one conversion pass that
puts it on a backend, in place (the state dict does not change):

    torch   the reference (reference.py): the model's own modules and attention ops
    cpu     C++ kernels for decode products, one-pass RMSNorm and RoPE, decode attention (cpu/)

The plan (plan.py) says what attention may see; the backend decides how it is computed.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from torch import nn

from ..model.attention import Prefill
from . import cpu, reference

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "cpu")


def choose(model: nn.Module, name: Optional[str] = "auto") -> str:
    """The backend ``name`` means for this model: "auto" (or None) is "cpu" where its kernels pay (a CPU model
    of 256 MiB of weights or more, where decode is memory-bound), else "torch"."""
    if name in (None, "auto"):
        return "cpu" if cpu.pays(model) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def attach(model: nn.Module, name: Optional[str] = "auto", prefill: Prefill = "per_sequence") -> str:
    """Put ``model`` on the backend ``name`` (see ``choose``) with the given pre-fill attention path, and build
    what the backend's decode needs now. Returns the backend's name; logs what was prepared."""
    name = choose(model, name)
    reference.attach(model, prefill)
    if name == "cpu":
        t0 = time.perf_counter()
        cpu.attach(model, prefill)
        log.info("backend cpu: %s; ready in %.1f s", cpu.warm_up(model), time.perf_counter() - t0)
    return name
