"""Loading a checkpoint of either format into a :class:`~sirocco.model.Transformer`.

The model is built on the meta device (no memory), every tensor of the checkpoint is checked against the
config by name and shape from the files' headers, and only then are the tensors read one by one, converted
to the internal layout and dtype, and assigned to the model: a 7B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from tqdm import tqdm

from ..config import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from .files import HF, Layout, TensorFiles, find_layout
from .gguf import is_gguf, load_gguf
from .names import IGNORED_HF, from_hf_name, from_hf_rope, rope_heads, to_hf_name

if TYPE_CHECKING:
    from ..backends.quant.convert import QuantReport

log = logging.getLogger(__name__)


# Weights read, converted and quantized at once when quantizing while loading (at least one row, or one head of
# wq/wk): 4 MiB in fp32, so the pass's own memory is a small fraction of even a small quantized model.
QUANTIZE_CHUNK = 2**16


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
               head: bool = True, progress: Optional[bool] = None, quantize: Optional[str] = None) -> Transformer:
    """A model from a checkpoint folder in either published format.

    Args:
        path: a folder with ``params.json`` + ``consolidated.safetensors`` / ``consolidated.00.pth``, or
            ``config.json`` + ``model.safetensors`` / sharded ``model-*.safetensors`` with their index, or a
            ``.gguf`` file (gguf.py: its q8_0/q4_0 weights stay quantized, as ``QuantLinear``).
        dtype, device: of the loaded weights (converted tensor by tensor while reading).
        max_seq_len: overrides the config's (it sizes the KV cache of layers without a window).
        layers, embed, head: load only these layers / the embedding / the final norm and output (a pipeline
            stage); the other tensors are not read.
        progress: a progress bar over tensors (default: when standard error is a terminal).
        quantize: ``int8`` / ``int4`` (or ``q8_0`` / ``q4_0``): the model that ``backends.quant.attach`` makes of
            the loaded one, bit for bit, with each linear weight quantized as it is read (see ``load_quantized``).
    """
    return _load(path, dtype, device, max_seq_len, layers, embed, head, progress, quantize)[0]


def load_quantized(path: str | Path, fmt: str, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", max_seq_len: Optional[int] = None,
                   layers: Optional[list[int]] = None, embed: bool = True, head: bool = True,
                   progress: Optional[bool] = None) -> tuple[Transformer, QuantReport]:
    """``load_model`` quantizing to ``fmt`` while it reads, and the report (bytes before and after) that
    ``attach`` would give.

    The linear layers to quantize become ``QuantLinear`` with empty blocks before any data is read; each of their
    weights is then read from its file a few rows at a time (``QUANTIZE_CHUNK`` weights: plain file reads, no
    pages of the file left resident), converted to ``dtype`` as loading would, quantized and written into its
    blocks, so the float model never exists. The other tensors load as in ``load_model``. A GGUF file is loaded
    as it is and then given to ``attach`` (its quantized layers stay as stored)."""
    model, report = _load(path, dtype, device, max_seq_len, layers, embed, head, progress, fmt)
    assert report is not None
    return model, report


def _load(path: str | Path, dtype: torch.dtype, device: torch.device | str, max_seq_len: Optional[int],
          layers: Optional[list[int]], embed: bool, head: bool, progress: Optional[bool],
          quantize: Optional[str]) -> tuple[Transformer, Optional[QuantReport]]:
    """``load_model``'s work; the quantization report too where ``quantize`` asks for it."""
    from ..backends.quant.convert import attach_if, empty_quantized, finish
    if is_gguf(path):
        model = load_gguf(path, dtype=dtype, device=device, max_seq_len=max_seq_len, layers=layers, embed=embed,
                          head=head, progress=progress)
        return model, attach_if(model, quantize, progress)
    layout = find_layout(path)
    args = layout.read_args(max_seq_len)
    with torch.device("meta"):
        model = Transformer(args, layers=layers, embed=embed, head=head)
    wanted = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files, names = _open_checked(layout, args, wanted)
    empty = empty_quantized(model, quantize, device) if quantize else None
    blocks = empty.blocks if empty else {}
    expert_rows = _expert_stacks(model, {k: v for k, v in wanted.items() if k not in blocks}, dtype, device)
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(wanted, desc=f"loading {layout.folder.name}", unit="tensor", disable=_no_bar(progress),
                     leave=False):
        if name in blocks:
            fmt, out = blocks[name]
            _quantize_into(out, fmt, files, names[name], name, args, layout.format, dtype)
            state[name.removesuffix(".weight") + ".qweight"] = out
            continue
        if name in expert_rows:           # read as a private copy (no mapped pages left behind) into its row
            state[name] = expert_rows[name]
            state[name].copy_(_read(files, names[name], name, args, layout.format, mapped=False))
            continue
        # Keep a tensor memory-mapped only if it is used as stored; a converted one is read as a private copy.
        mapped = files.dtype(names[name]) == dtype and torch.device(device).type == "cpu"
        state[name] = _read(files, names[name], name, args, layout.format, mapped).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    n = sum(math.prod(shape) for shape in wanted.values())
    what = "" if layers is None and embed and head else f" (stage: layers {layers}, embed={embed}, head={head})"
    log.info("loaded %s (%s format, %d tensors, %.1fM parameters%s) as %s on %s", layout.folder, layout.format,
             len(state), n / 1e6, what, str(dtype).replace("torch.", ""), device)
    if empty is None:
        return model, None
    return model, finish(model, empty.fmt, len(blocks), empty.kept, n * dtype.itemsize)


def _expert_stacks(model: Transformer, wanted: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   device: torch.device | str) -> dict[str, torch.Tensor]:
    """For every MoE layer and float expert matrix (w1, w3, w2) of ``wanted``, one (E, out, in) tensor; returns each
    expert weight's name -> its row, to be read into. The experts' decode kernel (``backends.moe``) wants them
    stacked: loaded apart, stacking them would copy each (and keep the mapped file's pages resident beside the
    copy, twice the experts' bytes)."""
    from ..backends.moe import expert_groups
    rows: dict[str, torch.Tensor] = {}
    for paths in expert_groups(model):
        expert_names = [p + ".weight" for p in paths]
        if all(n in wanted for n in expert_names):
            stacked = torch.empty((len(expert_names), *wanted[expert_names[0]]), dtype=dtype, device=device)
            rows.update(zip(expert_names, stacked))
    return rows


def _quantize_into(out: torch.Tensor, fmt: str, files: TensorFiles, stored: str, name: str, args: ModelArgs,
                   layout_format: str, dtype: torch.dtype) -> None:
    """Write the stored weight ``stored`` quantized to ``fmt`` into the blocks ``out``, ``QUANTIZE_CHUNK`` weights
    (whole heads of wq/wk, whose rows the Hugging Face layout permutes within a head) at a time, each converted to
    ``dtype`` first as a loaded weight would be: the bits of ``quantize(loaded weight)``, since blocks run along
    rows."""
    from ..backends.quant.formats import quantize
    rows, k = files.shape(stored)
    heads = rope_heads(name, args.n_heads, args.n_kv_heads) if layout_format == HF else None
    unit = rows // heads if heads else 1
    step = max(unit, QUANTIZE_CHUNK // k // unit * unit)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            chunk = _read(files, stored, name, args, layout_format, rows=(r0, r1))
            out[r0:r1].copy_(quantize(chunk.to(dtype), fmt))


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
