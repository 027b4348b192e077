"""Backends: how the model's products, norms, rotations and attention are computed.

The model (model/) is the definition in plain PyTorch; ``attach(model, backend, quantize=..., blocks=...,
prefill=...)`` (conversion.py) is the one conversion pass that puts a loaded model on a backend with its weight
format, in place:

    torch   the reference (reference.py): the model's own modules and attention ops
    cpu     C++ kernels for decode products, one-pass RMSNorm and RoPE, decode attention (cpu/)

Quantized weights (quant/) run on both. The plan (plan.py) says what attention may see; the backend decides how
it is computed.
"""

from .conversion import BACKENDS, Conversion, attach, backend_of, choose, prefill_of

__all__ = ["BACKENDS", "Conversion", "attach", "backend_of", "choose", "prefill_of"]
