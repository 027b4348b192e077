"""Quantized weights' steps of the conversion pass (``backends.attach``): blocks for a loader to fill
(``empty_blocks``), ``QuantLinear`` over given blocks (``use_blocks``) or over float weights quantized now
(``quantize_linears``, ``quantize_embedding``), and the kernels over them (``quantized_kernels``). Nothing here is
called but by the pass and the loaders.

``--quantize`` names a mix (``QUANTIZE``; mixes.py): llama.cpp's ``q4_K_M``, ``q5_K_M``, ``q6_K``, ``q3_K_M``,
``q2_K`` and ``iq4_xs``, or sirocco's own ``q8_0`` and ``q4_0`` (``int8`` and ``int4`` are their other names).
Which tensor gets which block type is one rule, ``mixes.tensor_type``, shared with the GGUF writer, so a model
quantized at load and the GGUF file ``sirocco quantize`` writes from it hold the same weights:

- the linear layers of attention and feed-forward (every expert's) and the output head: the mix's type for each
  (llama.cpp's mixes promote attention-v, feed-forward-down and more; a K that the type's block does not divide
  falls back to a 32-value type, or float where even 32 does not divide it, logged);
- the MoE router (``gate``) and the norms: float in every mix (llama.cpp keeps ``ffn_gate_inp`` as it is);
- the token embedding: float in sirocco's two mixes; in llama.cpp's, the file stores it in the mix's type and
  sirocco runs it dequantized (a table lookup), so quantizing at load rounds the table through that type
  (``quantize_embedding``): the model then holds the values the file's blocks give.

The bytes are ``quantize_weight``'s: formats.quantize for q8_0 and q4_0 (the gguf package's reference), and
quantizers.quantize (ggml's searches for scales and mins) for the other types.

Mixtral's experts: one ``QuantLinear`` per expert whose ``qweight`` is a view of the layer's stacked blocks, one
(E, H, bytes) uint8 buffer per matrix (backends/moe.py); every mix gives the experts of one matrix of one layer
one type, so the stack holds one type, and where the three matrices share it a decode step reads them in one
``qmoe`` call.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from sirocco.backends.moe import expert_groups, stack_experts
from sirocco.backends.quant import formats, kernels, quantizers
from sirocco.backends.quant.formats import BLOCK, QuantizedTensor, packed_shape
from sirocco.backends.quant.hugepages import huge_page_tensors
from sirocco.backends.quant.linear import QuantLinear, fuse_projections
from sirocco.backends.quant.mixes import MixModel, mix_name, tensor_type

log = logging.getLogger(__name__)

# --quantize names: sirocco's two earlier ones, then every mix by the name llama-quantize takes (any case)
ALIASES = {"int8": "Q8_0", "int4": "Q4_0"}
QUANTIZE = ("int8", "int4", "q8_0", "q4_0", "q4_K_M", "q5_K_M", "q6_K", "q3_K_M", "q2_K", "iq4_xs")
ROUTER_SUFFIX = "feed_forward.gate"
EMBEDDING = "tok_embeddings"
# An embedding whose float table holds the values of blocks of some type (a GGUF file's, or rounded here) carries
# that type under this attribute, so that quantizing again never rounds it twice.
ROUNDED_THROUGH = "rounded_through"
DEQUANTIZE_CHUNK = 2**20          # values dequantized at a time (``dequantize_rows``)


def resolve(name: str) -> str:
    """The mix a ``--quantize`` name means: ``int8`` -> ``Q8_0``, ``int4`` -> ``Q4_0``, ``q4_k_m`` -> ``Q4_K_M``."""
    try:
        return ALIASES.get(name) or mix_name(name)
    except ValueError:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZE)}") from None


def layer_type(path: str, mix: str, shape: tuple[int, ...], model: MixModel) -> str | None:
    """The block type the weight of the layer at module path ``path`` (``layers.0.attention.wq``, ``output``,
    ``tok_embeddings``) of ``shape`` gets in ``mix``; None keeps it in float."""
    return tensor_type(resolve(mix), path + ".weight", shape, model)


def quantize_weight(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The blocks of float weight ``w`` (..., K) in ``qtype``: uint8 (..., K // values * bytes)."""
    if qtype in formats.FORMATS:
        return formats.quantize(w, qtype)
    return quantizers.quantize(w, qtype)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized blocks included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@dataclass
class QuantReport:
    """What quantizing did: the mix (``Q4_K_M``, ``Q8_0``, ...), the linear layers holding blocks and how many of
    each type, those kept in float by path, the type the embedding was rounded through (None: float), and the
    model's bytes before and after."""

    mix: str
    layers: int                 # linear layers holding blocks (QuantLinear)
    kept: list[str]             # linear layers kept in float, by path
    bytes_before: int
    bytes_after: int
    types: dict[str, int] = field(default_factory=dict)      # QuantLinear layers by block type
    embedding: str | None = None

    def describe(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        table = f"embedding rounded through {self.embedding}" if self.embedding else "embedding in float"
        return (f"quantized {self.layers} linear layers to {self.mix} ({types}; {table}; norms and router in "
                f"float): {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def quantized_layers(model: nn.Module, mix: str) -> tuple[dict[str, tuple[nn.Linear, str]], list[str]]:
    """The plain linear layers of ``model`` (a ``Transformer`` or a stage of one) that quantizing to ``mix``
    replaces, module path -> (the layer, its type by ``layer_type``), and those kept in float because of their
    input size, by path (the router, float by design, is in neither)."""
    mix = resolve(mix)
    shapes = MixModel.of(model.args)                              # type: ignore[arg-type]
    chosen: dict[str, tuple[nn.Linear, str]] = {}
    kept: list[str] = []
    for path, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        target = layer_type(path, mix, (m.out_features, m.in_features), shapes)
        if target is not None:
            chosen[path] = (m, target)
        elif not path.endswith(ROUTER_SUFFIX):
            kept.append(path)
    return chosen, kept


def quantize_linears(model: nn.Module, mix: str, progress: bool | None = None) -> list[str]:
    """Replace the plain linear layers of ``model`` that ``mix`` quantizes by ``QuantLinear`` holding their weights
    quantized (``QuantLinear`` layers are left as they are); returns the paths of the layers kept in float for
    their input size. A step of the conversion pass (``backends.attach``)."""
    chosen, kept = quantized_layers(model, mix)
    with torch.no_grad():
        for path, (linear, target) in tqdm(chosen.items(), desc=f"quantizing to {resolve(mix)}", unit="layer",
                                           leave=False, disable=None if progress is None else not progress):
            qt = QuantizedTensor(quantize_weight(linear.weight.detach(), target), target,
                                 (linear.out_features, linear.in_features))
            replace(model, path, QuantLinear.from_quantized(qt, None if linear.bias is None
                                                            else linear.bias.detach()))
    return kept


def embedding_blocks(model: nn.Module, mix: str) -> QuantizedTensor | None:
    """The blocks ``mix`` stores the token embedding in, quantized from the float table ``model`` holds; None for
    a mix that keeps it in float, a stage without the embedding, or a table already rounded through a type (a GGUF
    file's, or by ``quantize_embedding``)."""
    table = getattr(model, EMBEDDING, None)
    if not isinstance(table, nn.Embedding) or table.weight.is_meta or getattr(table, ROUNDED_THROUGH, None):
        return None
    target = layer_type(EMBEDDING, mix, tuple(table.weight.shape), MixModel.of(model.args))  # type: ignore[arg-type]
    if target is None:
        return None
    return QuantizedTensor(quantize_weight(table.weight.detach(), target), target, tuple(table.weight.shape))


def quantize_embedding(model: nn.Module, mix: str) -> QuantizedTensor | None:
    """Round the token embedding of ``model`` through the type ``mix`` stores it in (llama.cpp's mixes): its float
    table becomes the dequantized blocks, in its dtype, as reading the GGUF file of that mix gives it. Returns the
    blocks (what a GGUF writer stores), or None where nothing was rounded (see ``embedding_blocks``). A step of
    the conversion pass."""
    blocks = embedding_blocks(model, mix)
    if blocks is None:
        return None
    table = getattr(model, EMBEDDING)
    with torch.no_grad():
        table.weight.data = dequantize_rows(blocks, table.weight.dtype, table.weight.device)
    setattr(table, ROUNDED_THROUGH, blocks.fmt)
    return blocks


def dequantize_rows(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The float weight (rows, K) that the blocks ``qt`` hold, in ``dtype`` on ``device``, dequantized
    ``DEQUANTIZE_CHUNK`` values at a time: the dequantizer's integer and fp32 temporaries are several times the
    fp32 weight, so a 7B model's embedding dequantized at once would take gigabytes."""
    rows = qt.shape[0]
    out = torch.empty(qt.shape, dtype=dtype, device=device)
    step = max(1, DEQUANTIZE_CHUNK // max(1, math.prod(qt.shape[1:])))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        part = QuantizedTensor(qt.data[r0:r1], qt.fmt, (r1 - r0, *qt.shape[1:]))
        out[r0:r1] = part.dequantize().to(device=device, dtype=dtype)
    return out


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

    mix: str
    blocks: dict[str, QuantizedTensor]      # module path -> blocks to fill in place (uint8 ``data``)
    kept: list[str]


def empty_blocks(model: nn.Module, mix: str, device: torch.device | str) -> EmptyBlocks:
    """Blocks, allocated on ``device`` but not yet written, for the linear layers of ``model`` (typically built on
    the meta device) that quantizing to ``mix`` replaces, so that a loader can quantize each float weight into
    them as it reads it (``quantize_weight``): the layers and types of ``quantize_linears`` without the float
    model. Every MoE layer's experts of one matrix get rows of one (E, N, bytes) buffer, which the conversion pass
    then stacks as it is. On CPU all the buffers are in huge-page memory (hugepages.py: decode reads them faster).
    No module is replaced: the conversion pass puts ``QuantLinear`` over the blocks once they are written."""
    mix = resolve(mix)
    chosen, kept = quantized_layers(model, mix)
    groups = _shared_buffers(model, chosen)
    targets = [chosen[paths[0]][1] for paths in groups]
    firsts = [chosen[paths[0]][0] for paths in groups]
    shapes = [(len(paths), *packed_shape((first.out_features, first.in_features), target))
              for paths, first, target in zip(groups, firsts, targets, strict=True)]
    buffers = (huge_page_tensors(shapes) if torch.device(device).type == "cpu" else
               [torch.empty(shape, dtype=torch.uint8, device=device) for shape in shapes])
    blocks: dict[str, QuantizedTensor] = {}
    for paths, target, stacked in zip(groups, targets, buffers, strict=True):
        for path, qweight in zip(paths, stacked, strict=True):
            linear = chosen[path][0]
            blocks[path] = QuantizedTensor(qweight, target, (linear.out_features, linear.in_features))
    return EmptyBlocks(mix, blocks, kept)


def _shared_buffers(model: nn.Module, chosen: dict[str, tuple[nn.Linear, str]]) -> list[list[str]]:
    """The paths of ``chosen`` grouped by the buffer their blocks share: a MoE layer's experts of one matrix (of one
    type, as every mix gives them), else one path each."""
    grouped = [paths for paths in expert_groups(model)
               if all(p in chosen for p in paths) and len({chosen[p][1] for p in paths}) == 1]
    inside = {p for paths in grouped for p in paths}
    return grouped + [[p] for p in chosen if p not in inside]


def quantized_kernels(model: nn.Module) -> None:
    """The kernels of quantized weights: the blocks interleaved in place where the decode kernels read that layout
    (``interleave_weights``), every MoE layer's experts stacked (``qmoe``, where the layer's three matrices share
    one type), and the projections that share an input fused (``SharedInputProjections``). A step of the conversion
    pass (``backends.attach``)."""
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


def report(model: nn.Module, mix: str, kept: list[str], bytes_before: int) -> QuantReport:
    """What quantizing did, logged: the layers now quantized by type, those kept in float, the embedding's type,
    the bytes before and after."""
    if kept:
        log.info("kept in float (input size not a multiple of %d): %s", BLOCK, ", ".join(kept))
    types: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            types[m.fmt] = types.get(m.fmt, 0) + 1
    out = QuantReport(resolve(mix), sum(types.values()), kept, bytes_before, model_bytes(model), types,
                      getattr(getattr(model, EMBEDDING, None), ROUNDED_THROUGH, None))
    log.info("%s", out.describe())
    return out


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at module path ``path`` of ``model``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
