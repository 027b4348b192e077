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

from sirocco.backends.moe import expert_groups, stack_experts
from sirocco.backends.quant.formats import BLOCK, FORMATS, packed_shape
from sirocco.backends.quant.hugepages import huge_page_tensors
from sirocco.backends.quant.linear import QuantLinear, fuse_projections

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


def quantized_layers(model: nn.Module, fmt: str) -> tuple[dict[str, tuple[nn.Linear, str]], list[str]]:
    """The plain linear layers of ``model`` that quantizing to ``fmt`` replaces, module path -> (the layer, its
    format by ``layer_format``), and those kept in float because of their input size, by path (the router, float
    by design, is in neither)."""
    chosen: dict[str, tuple[nn.Linear, str]] = {}
    kept: list[str] = []
    for path, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        target = layer_format(path, fmt, m.in_features)
        if target is not None:
            chosen[path] = (m, target)
        elif not path.endswith(ROUTER_SUFFIX):
            kept.append(path)
    return chosen, kept


def attach(model: nn.Module, fmt: str, progress: Optional[bool] = None) -> QuantReport:
    """Quantize ``model``'s linear layers in place (see the module docstring); ``fmt`` is ``q8_0``/``q4_0`` or
    ``int8``/``int4``. Layers that already are ``QuantLinear`` are left as they are. Logs the bytes before and
    after and returns them."""
    fmt = resolve(fmt)
    before = model_bytes(model)
    chosen, kept = quantized_layers(model, fmt)
    with torch.no_grad():
        for path, (linear, target) in tqdm(chosen.items(), desc=f"quantizing to {fmt}", unit="layer", leave=False,
                                           disable=None if progress is None else not progress):
            _replace(model, path, QuantLinear.from_linear(linear, target))
    return finish(model, fmt, len(chosen), kept, before)


def attach_if(model: nn.Module, fmt: Optional[str], progress: Optional[bool] = None) -> Optional[QuantReport]:
    """``attach(model, fmt)`` where ``fmt`` is given (a model built or loaded in float: a GGUF file's, the demo's,
    a random pipeline stage); None otherwise."""
    return attach(model, fmt, progress) if fmt else None


@dataclass
class EmptyBlocks:
    """What ``empty_quantized`` left for a loader to write: each quantized layer's blocks by the name of the float
    weight they stand for (``layers.0.attention.wq.weight``), with their format."""

    fmt: str
    blocks: dict[str, tuple[str, torch.Tensor]]     # weight name -> (format, uint8 blocks to fill in place)
    kept: list[str]


def empty_quantized(model: nn.Module, fmt: str, device: torch.device | str) -> EmptyBlocks:
    """Replace the linear layers of ``model`` (typically built on the meta device) that ``fmt`` quantizes by
    ``QuantLinear`` whose blocks are allocated on ``device`` but not yet written, so that a loader can quantize
    each float weight into them as it reads it: the layers, formats and MoE stacks of ``attach``, without the
    float model. Every MoE layer's experts of one matrix get rows of one (E, N, bytes) buffer, which
    ``stack_experts`` (in ``finish``) then takes as it is. On CPU all the buffers are in huge-page memory
    (hugepages.py: decode reads them faster)."""
    fmt = resolve(fmt)
    chosen, kept = quantized_layers(model, fmt)
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    groups = _shared_buffers(model, chosen)
    targets = [chosen[paths[0]][1] for paths in groups]
    firsts = [chosen[paths[0]][0] for paths in groups]
    shapes = [(len(paths), *packed_shape((first.out_features, first.in_features), target))
              for paths, first, target in zip(groups, firsts, targets)]
    buffers = (huge_page_tensors(shapes) if torch.device(device).type == "cpu" else
               [torch.empty(shape, dtype=torch.uint8, device=device) for shape in shapes])
    for paths, target, stacked in zip(groups, targets, buffers):
        for path, qweight in zip(paths, stacked):
            linear = chosen[path][0]
            q = QuantLinear(linear.in_features, linear.out_features, target, bias=linear.bias is not None,
                            device=torch.device("meta"))
            q.qweight = qweight
            _replace(model, path, q)
            blocks[path + ".weight"] = (target, qweight)
    return EmptyBlocks(fmt, blocks, kept)


def _shared_buffers(model: nn.Module, chosen: dict[str, tuple[nn.Linear, str]]) -> list[list[str]]:
    """The paths of ``chosen`` grouped by the buffer their blocks share: a MoE layer's experts of one matrix (of one
    format), else one path each."""
    grouped = [paths for paths in expert_groups(model)
               if all(p in chosen for p in paths) and len({chosen[p][1] for p in paths}) == 1]
    inside = {p for paths in grouped for p in paths}
    return grouped + [[p] for p in chosen if p not in inside]


def finish(model: nn.Module, fmt: str, layers: int, kept: list[str], bytes_before: int) -> QuantReport:
    """After the layers are quantized: give the model the kernels of its quantized weights, log what was kept in
    float and the bytes before and after, and return them."""
    attach_kernels(model)
    if kept:
        log.info("kept in float (input size not a multiple of %d): %s", BLOCK, ", ".join(kept))
    report = QuantReport(fmt, layers, kept, bytes_before, model_bytes(model))
    log.info("%s", report.describe())
    return report


def attach_kernels(model: nn.Module) -> None:
    """The one-call kernels of quantized weights: every MoE layer's experts stacked (``qmoe``), and the projections
    that share an input fused (``SharedInputProjections``)."""
    stack_experts(model, quantized=True)
    fuse_projections(model)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
