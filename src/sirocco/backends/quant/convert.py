"""The quantize-at-load pass: ``attach(model, fmt)`` replaces the model's linear layers by ``QuantLinear`` in place.

Which layers, and in which format, is one rule (``layer_format``) shared with the GGUF writer, so a model
quantized at load and the GGUF file ``sirocco quantize`` writes from it hold the same weights:

- attention (wq, wk, wv, wo) and feed-forward (w1, w2, w3, every expert's): ``fmt``;
- the output head: q8_0 whatever ``fmt`` (llama.cpp's quantize gives the head more bits than the body too: q8_0
  stays q8_0, and q4_0 gets q6_K, a format sirocco does not have; q8_0 is the nearest it has);
- kept in float: the embedding (a table lookup, read one row per token), the norms, and the MoE router (``gate``:
  small, and a change in its logits changes which experts run), as llama.cpp keeps ``ffn_gate_inp``;
- a layer whose input size is not a multiple of 32 (the block size) stays in float, logged.

Mixtral's experts: one ``QuantLinear`` per expert whose ``qweight`` is a view of the layer's stacked blocks, one
(E, H, bytes) uint8 buffer per matrix (backends/moe.py), which a decode step reads in one ``qmoe`` call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from sirocco.backends.moe import stack_experts
from sirocco.backends.quant.formats import BLOCK, FORMATS
from sirocco.backends.quant.linear import QuantLinear

log = logging.getLogger(__name__)

# --quantize names -> GGUF block formats
ALIASES = {"int8": "q8_0", "int4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0"}
HEAD_FORMAT = "q8_0"
ROUTER_SUFFIX = "feed_forward.gate"


def resolve(name: str) -> str:
    """``int8`` -> ``q8_0``, ``int4`` -> ``q4_0`` (the block formats themselves are accepted too)."""
    try:
        return ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(ALIASES)}") from None


def layer_format(path: str, fmt: str, in_features: int) -> Optional[str]:
    """The format the linear layer at module path ``path`` (``layers.0.attention.wq``, ``output``, ...) gets when a
    model is quantized to ``fmt``; None keeps it in float."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; known: {', '.join(FORMATS)}")
    if path.endswith(ROUTER_SUFFIX) or in_features % BLOCK:
        return None
    if path == "output":
        return HEAD_FORMAT
    return fmt


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized blocks included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@dataclass
class QuantReport:
    fmt: str
    layers: int                 # linear layers now quantized
    kept: list[str]             # linear layers kept in float, by path
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (f"quantized {self.layers} linear layers to {self.fmt} (output head {HEAD_FORMAT}; embedding, norms "
                f"and router in float): {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def attach(model: nn.Module, fmt: str, progress: Optional[bool] = None) -> QuantReport:
    """Quantize ``model``'s linear layers in place (see the module docstring); ``fmt`` is ``q8_0``/``q4_0`` or
    ``int8``/``int4``. Layers that already are ``QuantLinear`` are left as they are. Logs the bytes before and
    after and returns them."""
    fmt = resolve(fmt)
    before = model_bytes(model)
    targets = [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear]
    kept: list[str] = []
    n = 0
    with torch.no_grad():
        for path, linear in tqdm(targets, desc=f"quantizing to {fmt}", unit="layer", leave=False,
                                 disable=None if progress is None else not progress):
            target = layer_format(path, fmt, linear.in_features)
            if target is None:
                if not path.endswith(ROUTER_SUFFIX):
                    kept.append(path)
                continue
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantLinear.from_linear(linear, target))
            n += 1
    stack_experts(model, quantized=True)
    if kept:
        log.info("kept in float (input size not a multiple of %d): %s", BLOCK, ", ".join(kept))
    report = QuantReport(fmt, n, kept, before, model_bytes(model))
    log.info("%s", report.describe())
    return report
