"""Loading a checkpoint of either format into a :class:`~sirocco.model.Transformer`.

The model is built on the meta device (no memory), every tensor of the checkpoint is checked against the
config by name and shape from the files' headers, and only then are the tensors read one by one, converted
to the internal layout and dtype, and assigned to the model: a 7B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..config import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from .files import HF, Layout, TensorFiles, find_layout
from .gguf import is_gguf, load_gguf
from .names import IGNORED_HF, from_hf_name, from_hf_rope, rope_heads, to_hf_name

log = logging.getLogger(__name__)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
               head: bool = True, progress: Optional[bool] = None) -> Transformer:
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
    """
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, device=device, max_seq_len=max_seq_len, layers=layers, embed=embed,
                         head=head, progress=progress)
    layout = find_layout(path)
    args = layout.read_args(max_seq_len)
    with torch.device("meta"):
        model = Transformer(args, layers=layers, embed=embed, head=head)
    wanted = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files, names = _open_checked(layout, args, wanted)
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(wanted, desc=f"loading {layout.folder.name}", unit="tensor", disable=_no_bar(progress),
                     leave=False):
        # Keep a tensor memory-mapped only if it is used as stored; a converted one is read as a private copy.
        mapped = files.dtype(names[name]) == dtype and torch.device(device).type == "cpu"
        state[name] = _read(files, names[name], name, args, layout.format, mapped).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    n = sum(t.numel() for t in state.values())
    what = "" if layers is None and embed and head else f" (stage: layers {layers}, embed={embed}, head={head})"
    log.info("loaded %s (%s format, %d tensors, %.1fM parameters%s) as %s on %s", layout.folder, layout.format,
             len(state), n / 1e6, what, str(dtype).replace("torch.", ""), device)
    return model


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


def _read(files: TensorFiles, stored: str, name: str, args: ModelArgs, fmt: str, mapped: bool = True
          ) -> torch.Tensor:
    t = files.get(stored, mapped)
    heads = rope_heads(name, args.n_heads, args.n_kv_heads) if fmt == HF else None
    return from_hf_rope(t, heads) if heads else t


def _listing(items: list[str], limit: int = 6) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _no_bar(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress
