"""Loading a checkpoint of either format into a :class:`~sirocco.model.Transformer`.

The model is built on the meta device (no memory), every tensor of the checkpoint is checked against the
config by name and shape from the files' headers, and only then are the tensors read one by one, converted
to the internal layout and dtype, and assigned to the model: a 7B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from .. import backends
from ..backends.moe import expert_groups
from ..backends.quant import formats
from ..backends.quant.convert import ROUNDED_THROUGH, QuantReport, empty_blocks, quantize_weight
from ..backends.quant.formats import QuantizedTensor
from ..config import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from ..model.attention import Prefill
from .files import HF, Layout, TensorFiles, find_layout
from .gguf_read import GGUFFile, is_gguf
from .names import IGNORED_HF, from_hf_name, from_hf_rope, rope_heads, to_hf_name

log = logging.getLogger(__name__)


# Weights read, converted and quantized at once when quantizing while loading (at least one row, or one head of
# wq/wk): 256 KiB in fp32 for q8_0 and q4_0, whose quantizers are a few vector operations; SEARCH_PIECES times that
# for the types whose scales come from a search, so that the quantizer spreads each piece over its pool of threads
# (quantizers.CHUNK_VALUES each). Either way the pass's own memory is a small fraction of a quantized model.
QUANTIZE_CHUNK = 2**16
SEARCH_PIECES = 4

Source = Union[str, Path, GGUFFile]


@dataclass
class ModelParts:
    """What a loader read, before the conversion pass (``backends.attach``) makes a model of it: the model with
    its float tensors, where each linear layer of ``blocks`` still has no weight (on the meta device), and the
    quantized weights' blocks by module path (``layers.0.attention.wq``): a GGUF file's, or a checkpoint's
    quantized while it was read."""

    model: Transformer
    blocks: dict[str, QuantizedTensor]


def load_model(path: Source, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
               head: bool = True, progress: Optional[bool] = None, quantize: Optional[str] = None,
               backend: Optional[str] = "torch", prefill: Prefill = "per_sequence") -> Transformer:
    """A model from a checkpoint: ``read_model``, then the conversion pass ``backends.attach`` onto ``backend``
    (default the plain-PyTorch reference) with the pre-fill attention path ``prefill``.

    Args:
        path: a folder with ``params.json`` + ``consolidated.safetensors`` / ``consolidated.00.pth``, or
            ``config.json`` + ``model.safetensors`` / sharded ``model-*.safetensors`` with their index, or a
            ``.gguf`` file (or an open ``GGUFFile``: its quantized weights stay quantized, as ``QuantLinear``).
        dtype, device: of the loaded weights (converted tensor by tensor while reading).
        max_seq_len: overrides the config's (it sizes the KV cache of layers without a window).
        layers, embed, head: load only these layers / the embedding / the final norm and output (a pipeline
            stage); the other tensors are not read.
        progress: a progress bar over tensors (default: when standard error is a terminal).
        quantize: a mix (``q4_K_M``, ``q5_K_M``, ``q6_K``, ``q3_K_M``, ``q2_K``, ``iq4_xs``, ``q8_0`` / ``int8``,
            ``q4_0`` / ``int4``): the model that quantizing the loaded one gives, bit for bit, with each linear
            weight of a folder quantized as it is read (see ``read_model``).
    """
    return _load(path, dtype, device, max_seq_len, layers, embed, head, progress, quantize, backend, prefill)[0]


def load_quantized(path: Source, mix: str, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", max_seq_len: Optional[int] = None,
                   layers: Optional[list[int]] = None, embed: bool = True, head: bool = True,
                   progress: Optional[bool] = None, backend: Optional[str] = "torch"
                   ) -> tuple[Transformer, QuantReport]:
    """``load_model`` quantizing to ``mix``, and the report (layers, bytes before and after) of the quantization."""
    model, conversion = _load(path, dtype, device, max_seq_len, layers, embed, head, progress, mix, backend,
                              "per_sequence")
    assert conversion.quantized is not None
    return model, conversion.quantized


def _load(path: Source, dtype: torch.dtype, device: torch.device | str, max_seq_len: Optional[int],
          layers: Optional[list[int]], embed: bool, head: bool, progress: Optional[bool], quantize: Optional[str],
          backend: Optional[str], prefill: Prefill) -> tuple[Transformer, backends.Conversion]:
    parts = read_model(path, dtype, device, max_seq_len, layers, embed, head, progress, quantize)
    conversion = backends.attach(parts.model, backend, quantize=quantize, blocks=parts.blocks, prefill=prefill,
                                 progress=progress)
    return parts.model, conversion


def read_model(path: Source, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
               head: bool = True, progress: Optional[bool] = None, quantize: Optional[str] = None) -> ModelParts:
    """Read a checkpoint (arguments as ``load_model``) into a ``ModelParts`` for the conversion pass.

    The model is built on the meta device and its float tensors assigned as they are read. Where ``quantize``
    asks, a folder's linear weights to quantize get their blocks before any data is read (``empty_blocks``); each
    weight is then read a few rows at a time (``QUANTIZE_CHUNK`` weights: plain file reads, no pages of the file
    left resident), converted to ``dtype`` as loading would, quantized and written into its blocks, so the float
    model never exists. A GGUF file's quantized weights are its own blocks; its float ones are quantized by the
    conversion pass where ``quantize`` asks."""
    if isinstance(path, GGUFFile) or is_gguf(path):
        gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)
        weights = gguf.read(dtype, device, max_seq_len, layers, embed, head, progress)
        model = _assemble(weights.args, weights.state, weights.blocks, dtype, layers, embed, head)
        if weights.embedding_type is not None and model.tok_embeddings is not None:
            setattr(model.tok_embeddings, ROUNDED_THROUGH, weights.embedding_type)     # never rounded again
        log.info("loaded %s (GGUF) as %s on %s", gguf.path, str(dtype).replace("torch.", ""), device)
        return ModelParts(model, weights.blocks)
    layout = find_layout(path)
    args = layout.read_args(max_seq_len)
    with torch.device("meta"):
        meta = Transformer(args, layers=layers, embed=embed, head=head).to(dtype)
    wanted = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    files, names = _open_checked(layout, args, wanted)
    blocks = empty_blocks(meta, quantize, device).blocks if quantize else {}
    weights_of = {path + ".weight": qt for path, qt in blocks.items()}
    expert_rows = _expert_stacks(meta, {k: v for k, v in wanted.items() if k not in weights_of}, dtype, device)
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(wanted, desc=f"loading {layout.folder.name}", unit="tensor", disable=_no_bar(progress),
                     leave=False):
        if name in weights_of:
            qt = weights_of[name]
            _quantize_into(qt.data, qt.fmt, files, names[name], name, args, layout.format, dtype)
            continue
        if name in expert_rows:           # read as a private copy (no mapped pages left behind) into its row
            state[name] = expert_rows[name]
            state[name].copy_(_read(files, names[name], name, args, layout.format, mapped=False))
            continue
        # Keep a tensor memory-mapped only if it is used as stored; a converted one is read as a private copy.
        mapped = files.dtype(names[name]) == dtype and torch.device(device).type == "cpu"
        state[name] = _read(files, names[name], name, args, layout.format, mapped).to(device=device, dtype=dtype)
    model = _assemble(args, state, blocks, dtype, layers, embed, head)
    n = sum(math.prod(shape) for shape in wanted.values())
    what = "" if layers is None and embed and head else f" (stage: layers {layers}, embed={embed}, head={head})"
    log.info("loaded %s (%s format, %d tensors, %.1fM parameters%s) as %s on %s", layout.folder, layout.format,
             len(wanted), n / 1e6, what, str(dtype).replace("torch.", ""), device)
    return ModelParts(model, blocks)


def _assemble(args: ModelArgs, state: dict[str, torch.Tensor], blocks: dict[str, QuantizedTensor],
              dtype: torch.dtype, layers: Optional[list[int]], embed: bool, head: bool) -> Transformer:
    """The model (or stage) on the meta device in ``dtype``, with ``state`` assigned: every tensor but the weights
    of the linear layers that ``blocks`` stand for, which stay on the meta device for the conversion pass."""
    with torch.device("meta"):
        model = Transformer(args, layers=layers, embed=embed, head=head).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = sorted(set(missing) - {path + ".weight" for path in blocks})
    if left or unexpected:
        raise RuntimeError(f"loader bug: tensors not read {left[:6]}, or read and not in the model {unexpected[:6]}")
    return model.eval()


def _expert_stacks(model: Transformer, wanted: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   device: torch.device | str) -> dict[str, torch.Tensor]:
    """For every MoE layer and float expert matrix (w1, w3, w2) of ``wanted``, one (E, out, in) tensor; returns each
    expert weight's name -> its row, to be read into. The experts' decode kernel (``backends.moe``) wants them
    stacked: loaded apart, stacking them would copy each (and keep the mapped file's pages resident beside the
    copy, twice the experts' bytes)."""
    rows: dict[str, torch.Tensor] = {}
    for paths in expert_groups(model):
        expert_names = [p + ".weight" for p in paths]
        if all(n in wanted for n in expert_names):
            stacked = torch.empty((len(expert_names), *wanted[expert_names[0]]), dtype=dtype, device=device)
            rows.update(zip(expert_names, stacked))
    return rows


def _quantize_into(out: torch.Tensor, fmt: str, files: TensorFiles, stored: str, name: str, args: ModelArgs,
                   layout_format: str, dtype: torch.dtype) -> None:
    """Write the stored weight ``stored`` quantized to type ``fmt`` into the blocks ``out``, ``QUANTIZE_CHUNK`` weights
    (whole heads of wq/wk, whose rows the Hugging Face layout permutes within a head) at a time, each converted to
    ``dtype`` first as a loaded weight would be: the bits of ``quantize(loaded weight)``, since blocks run along
    rows."""
    rows, k = files.shape(stored)
    heads = rope_heads(name, args.n_heads, args.n_kv_heads) if layout_format == HF else None
    unit = rows // heads if heads else 1
    values = QUANTIZE_CHUNK * (1 if fmt in formats.FORMATS else SEARCH_PIECES)
    step = max(unit, values // k // unit * unit)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            chunk = _read(files, stored, name, args, layout_format, rows=(r0, r1))
            out[r0:r1].copy_(quantize_weight(chunk.to(dtype), fmt))


def read_state_dict(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], Layout]:
    """Every tensor of a checkpoint, checked and in sirocco's internal names and layout, in its stored dtype
    (what ``sirocco convert`` writes back out). Tensors of safetensors files stay memory-mapped until used."""
    if is_gguf(path):
        raise CheckpointError(f"{path}: a GGUF file holds quantized blocks, not a float state dict; load it with "
                              "load_model")
    layout = find_layout(path)
    args = layout.read_args()
    with torch.device("meta"):
        wanted = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
    files, names = _open_checked(layout, args, wanted)
    return args, {name: _read(files, names[name], name, args, layout.format) for name in wanted}, layout


def _open_checked(layout: Layout, args: ModelArgs, wanted: dict[str, tuple[int, ...]]
                  ) -> tuple[TensorFiles, dict[str, str]]:
    """Open the files and check them against the config before reading any data.

    Returns the files and, for each wanted internal name, its name in the files. Raises CheckpointError
    listing missing, unexpected and mis-shaped tensors with both shapes."""
    files = TensorFiles(layout.weights)
    with torch.device("meta"):
        every = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
    internal: dict[str, str] = {}        # internal name -> name in the files
    unexpected: list[str] = []
    for stored in files.names():
        if layout.format == HF:
            if IGNORED_HF.fullmatch(stored):
                continue
            try:
                name = from_hf_name(stored)
            except KeyError:
                unexpected.append(stored)
                continue
        else:
            name = stored
        if name not in every:
            unexpected.append(stored)
        else:
            internal[name] = stored
    missing = [name for name in wanted if name not in internal]
    wrong = [(internal[n], files.shape(internal[n]), shape) for n, shape in wanted.items()
             if n in internal and files.shape(internal[n]) != shape]
    problems = []
    if missing:
        shown = [n if layout.format != HF else to_hf_name(n) for n in missing]
        problems.append(f"{len(missing)} missing tensor(s): " + _listing(
            [f"{n} (expected shape {list(wanted[m])})" for n, m in zip(shown, missing)]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + _listing(
            [f"{n} {list(files.shape(n))}" for n in unexpected]))
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: " + _listing(
            [f"{n} has shape {list(got)} in the file, the config ({layout.config.name}) needs {list(need)}"
             for n, got, need in wrong]))
    if problems:
        raise CheckpointError(f"{layout.folder} does not match its {layout.config.name}: " + "; ".join(problems))
    return files, internal


def _read(files: TensorFiles, stored: str, name: str, args: ModelArgs, fmt: str, mapped: bool = True,
          rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The tensor in sirocco's layout (wq/wk of a Hugging Face checkpoint permuted back), whole or only ``rows``
    (start, stop), which must then hold whole heads of wq/wk (a private copy)."""
    t = files.get(stored, mapped) if rows is None else files.rows(stored, *rows)
    heads = rope_heads(name, args.n_heads, args.n_kv_heads) if fmt == HF else None
    if heads and rows is not None:
        heads = heads * t.shape[0] // files.shape(stored)[0]
    return from_hf_rope(t, heads) if heads else t


def _listing(items: list[str], limit: int = 6) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _no_bar(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress
