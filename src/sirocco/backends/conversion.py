"""The conversion pass: ``attach(model, backend, quantize=..., blocks=..., prefill=...)`` puts a loaded model on a
backend with a weight format. It is the only code that replaces the model's modules or fills its kernel slots
(``projection_kernel``, ``experts_kernel``), in place, in this order:

1. back to the reference (reference.py): modules a backend replaced give back the plain ones (the same
   parameters), every attention layer gets the reference ops with the pre-fill path ``prefill``, and float
   experts lose their kernel;
2. the weights: ``QuantLinear`` over the ``blocks`` a loader read (module path -> ``QuantizedTensor``: a GGUF
   file's, or a checkpoint's quantized while it was read), then the float linear layers that the mix
   ``quantize`` names (``q4_K_M``, ``int8``, ...: quant/convert.py says which layers, in which type) quantizes,
   quantized now, and the token embedding rounded through its type where the mix stores it quantized;
3. the kernels of quantized weights: each MoE layer's experts stacked for one ``qmoe`` call, the projections that
   share an input fused (quant/linear.py);
4. the backend: ``torch`` is step 1's reference; ``cpu`` replaces modules by C++-backed ones and hands the
   attention layers its ops (cpu/), and builds what decode needs now; ``auto`` is cpu for CPU models of 256 MiB
   of weights or more (counted after quantization), where decode is memory-bound, else torch.

Running it again moves the model to another backend or pre-fill path; the state dict does not change (except
where step 2 quantizes). The engine takes the model as this pass left it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from torch import nn

from ..model import Attention
from ..model.attention import Prefill
from . import cpu, reference
from .quant import convert as quant
from .quant.convert import QuantReport, model_bytes
from .quant.formats import QuantizedTensor

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "cpu")


@dataclass
class Conversion:
    """What ``attach`` did: the backend the model is on, its pre-fill attention path, and what quantizing did
    (None where ``quantize`` was not asked)."""

    backend: str
    prefill: str
    quantized: Optional[QuantReport] = None
    # the token embedding's blocks where this pass rounded it through a type (the model holds their values in
    # float): what a GGUF writer stores for it; not kept by the model
    embedding: Optional[QuantizedTensor] = None


def choose(model: nn.Module, name: Optional[str] = "auto") -> str:
    """The backend ``name`` means for this model: "auto" (or None) is "cpu" where its kernels pay (a CPU model
    of 256 MiB of weights or more, where decode is memory-bound), else "torch"."""
    if name in (None, "auto"):
        return "cpu" if cpu.pays(model) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def attach(model: nn.Module, backend: Optional[str] = "auto", quantize: Optional[str] = None,
           blocks: Optional[Mapping[str, QuantizedTensor]] = None, prefill: Prefill = "per_sequence",
           progress: Optional[bool] = None) -> Conversion:
    """Put ``model`` on ``backend`` with its weights as ``blocks`` and ``quantize`` say (see the module
    docstring). ``blocks`` stand for linear layers still without weights (on the meta device) or float ones;
    the bytes before quantizing count those layers in the model's float dtype. Logs what was prepared."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    before = model_bytes(model)
    reference.attach(model, prefill)
    if blocks:
        quant.use_blocks(model, blocks)
    kept = quant.quantize_linears(model, quantize, progress) if quantize else []
    embedding = quant.quantize_embedding(model, quantize) if quantize else None
    unloaded = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise RuntimeError(f"attach: tensors without data (a loader left them on the meta device): "
                           f"{', '.join(unloaded[:6])}")
    quant.quantized_kernels(model)
    report = quant.report(model, quantize, kept, before) if quantize else None
    name = choose(model, backend)
    if name == "cpu":
        t0 = time.perf_counter()
        cpu.attach(model, prefill)
        log.info("backend cpu: %s; ready in %.1f s", cpu.warm_up(model), time.perf_counter() - t0)
    return Conversion(name, prefill, report, embedding)


def backend_of(model: nn.Module) -> str:
    """The backend the model is on: "cpu" where the conversion pass put it there, else "torch"."""
    return "cpu" if any(isinstance(m, Attention) and isinstance(m.ops, cpu.CpuAttentionOps)
                        for m in model.modules()) else "torch"


def prefill_of(model: nn.Module) -> str:
    """The pre-fill attention path the model's attention layers take ("per_sequence" unless the conversion pass
    was given another)."""
    return next((m.ops.prefill_path for m in model.modules() if isinstance(m, Attention)), "per_sequence")
