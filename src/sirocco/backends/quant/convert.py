"""Quantized weights' steps of the conversion pass (``backends.attach``): blocks for a loader to fill
(``empty_blocks``), ``QuantLinear`` over given blocks (``use_blocks``) or over float weights quantized now
(``quantize_linears``), and the kernels over them (``quantized_kernels``). Nothing here is called but by the pass
and the loaders.

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
from typing import Mapping, Optional

import torch
from torch import nn
from tqdm import tqdm

from sirocco.backends.moe import expert_groups, stack_experts
from sirocco.backends.quant import kernels
from sirocco.backends.quant.formats import BLOCK, FORMATS, QuantizedTensor, packed_shape
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
    layers: int                 # linear layers holding blocks (QuantLinear)
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


def quantize_linears(model: nn.Module, fmt: str, progress: Optional[bool] = None) -> list[str]:
    """Replace the plain linear layers of ``model`` that ``fmt`` quantizes by ``QuantLinear`` holding their weights
    quantized (``QuantLinear`` layers are left as they are); returns the paths of the layers kept in float for
    their input size. A step of the conversion pass (``backends.attach``)."""
    chosen, kept = quantized_layers(model, resolve(fmt))
    with torch.no_grad():
        for path, (linear, target) in tqdm(chosen.items(), desc=f"quantizing to {fmt}", unit="layer", leave=False,
                                           disable=None if progress is None else not progress):
            replace(model, path, QuantLinear.from_linear(linear, target))
    return kept


def use_blocks(model: nn.Module, blocks: Mapping[str, QuantizedTensor]) -> None:
    """Replace the linear layer at each module path of ``blocks`` by a ``QuantLinear`` over those blocks, as they
    are (no copy). A step of the conversion pass (``backends.attach``)."""
    for path, qt in blocks.items():
        linear = model.get_submodule(path)
        if not isinstance(linear, (nn.Linear, QuantLinear)) or (linear.out_features, linear.in_features) != qt.shape:
            raise ValueError(f"{path}: blocks of shape {list(qt.shape)} for {linear}")
        replace(model, path, QuantLinear.from_quantized(qt))


@dataclass
class EmptyBlocks:
    """What ``empty_blocks`` left for a loader to write: each quantized layer's blocks by module path
    (``layers.0.attention.wq``), and the layers kept in float."""

    fmt: str
    blocks: dict[str, QuantizedTensor]      # module path -> blocks to fill in place (uint8 ``data``)
    kept: list[str]


def empty_blocks(model: nn.Module, fmt: str, device: torch.device | str) -> EmptyBlocks:
    """Blocks, allocated on ``device`` but not yet written, for the linear layers of ``model`` (typically built on
    the meta device) that quantizing to ``fmt`` replaces, so that a loader can quantize each float weight into
    them as it reads it: the layers and formats of ``quantize_linears`` without the float model. Every MoE layer's
    experts of one matrix get rows of one (E, N, bytes) buffer, which the conversion pass then stacks as it is. On
    CPU all the buffers are in huge-page memory (hugepages.py: decode reads them faster). No module is replaced:
    the conversion pass puts ``QuantLinear`` over the blocks once they are written."""
    fmt = resolve(fmt)
    chosen, kept = quantized_layers(model, fmt)
    groups = _shared_buffers(model, chosen)
    targets = [chosen[paths[0]][1] for paths in groups]
    firsts = [chosen[paths[0]][0] for paths in groups]
    shapes = [(len(paths), *packed_shape((first.out_features, first.in_features), target))
              for paths, first, target in zip(groups, firsts, targets)]
    buffers = (huge_page_tensors(shapes) if torch.device(device).type == "cpu" else
               [torch.empty(shape, dtype=torch.uint8, device=device) for shape in shapes])
    blocks: dict[str, QuantizedTensor] = {}
    for paths, target, stacked in zip(groups, targets, buffers):
        for path, qweight in zip(paths, stacked):
            linear = chosen[path][0]
            blocks[path] = QuantizedTensor(qweight, target, (linear.out_features, linear.in_features))
    return EmptyBlocks(fmt, blocks, kept)


def _shared_buffers(model: nn.Module, chosen: dict[str, tuple[nn.Linear, str]]) -> list[list[str]]:
    """The paths of ``chosen`` grouped by the buffer their blocks share: a MoE layer's experts of one matrix (of one
    format), else one path each."""
    grouped = [paths for paths in expert_groups(model)
               if all(p in chosen for p in paths) and len({chosen[p][1] for p in paths}) == 1]
    inside = {p for paths in grouped for p in paths}
    return grouped + [[p] for p in chosen if p not in inside]


def quantized_kernels(model: nn.Module) -> None:
    """The kernels of quantized weights: the blocks interleaved in place where the decode kernels read that layout
    (``interleave_weights``), every MoE layer's experts stacked (``qmoe``), and the projections that share an input
    fused (``SharedInputProjections``). A step of the conversion pass (``backends.attach``)."""
    interleave_weights(model)
    stack_experts(model, quantized=True)
    fuse_projections(model)


def interleave_weights(model: nn.Module) -> int:
    """Interleave every ``QuantLinear``'s blocks in place (``QuantLinear.interleave_``, interleave.py), one weight at
    a time, where this CPU's decode kernels read the interleaved layout (AVX512-VNNI); returns how many weights are
    interleaved. The blocks a loader handed the conversion pass are rearranged where they lie: ``file_blocks()``
    gives the file's back."""
    if not kernels.interleaving_pays():
        return 0
    return sum(m.interleave_() for m in model.modules() if isinstance(m, QuantLinear))


def deinterleave_weights(model: nn.Module) -> None:
    """Every ``QuantLinear``'s blocks back in the file's layout, in place (for comparisons: both layouts give the
    same bits)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.deinterleave_()


def report(model: nn.Module, fmt: str, kept: list[str], bytes_before: int) -> QuantReport:
    """What quantizing did, logged: the layers now quantized, those kept in float, the bytes before and after."""
    if kept:
        log.info("kept in float (input size not a multiple of %d): %s", BLOCK, ", ".join(kept))
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    out = QuantReport(resolve(fmt), layers, kept, bytes_before, model_bytes(model))
    log.info("%s", out.describe())
    return out


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at module path ``path`` of ``model``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
