"""Which model a name means and loading it with its tokenizer: a checkpoint folder (either published format), a
GGUF file (model and tokenizer from the one file), a bundled model's name, a Hugging Face Hub id (fetched through
the hub's cache), nothing (the default model), or the random demo model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mistral_common
import torch

from . import backends
from .backends.quant import QuantReport
from .checkpoint import GGUFFile, ModelParts, is_gguf, read_model
from .checkpoint.hub import parse_hub_name, resolve_hub_name
from .config import preset
from .errors import CheckpointError, SiroccoError
from .model import Transformer, build_model
from .model.attention import Prefill
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEMO = "random-tiny"     # a randomly initialised tiny model with Mistral's v1 tokenizer (noise; for plumbing)
BUNDLED = Path(__file__).parent / "models"     # models trained by sirocco itself, shipped in the package
DEFAULT_MODEL = "sirocco-tiny"


def bundled_models() -> list[str]:
    """Names of the models shipped in the package (folders of ``sirocco/models``)."""
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "params.json").is_file()) if BUNDLED.is_dir() else []


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    source: str          # what was loaded, from where: for logs and --json
    quantized: Optional[QuantReport] = None        # what quantizing at load did (load(quantize=...))
    backend: str = "torch"                         # what computes the model (``backends.attach``)


def model_folder(name_or_path: Optional[str]) -> Path:
    """The checkpoint that ``--model`` names: a folder or a ``.gguf`` file, a bundled model's name, a Hugging Face
    Hub id (``org/repo``, ``org/repo:Q4_K_M``, ``org/repo/file.gguf``: fetched into, or found in, the hub's cache;
    ``checkpoint/hub.py``), or None for the default (``sirocco-tiny``). A path that exists wins over a bundled
    model or a hub id of the same name."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in bundled_models():
        path = BUNDLED / name_or_path
        log.info("bundled model %s: %s", name_or_path, path)
        return path
    not_here = (f"--model {name_or_path}: no such folder or file, and not a bundled model "
                f"({', '.join(bundled_models() + [DEMO])})")
    hub = parse_hub_name(name_or_path)
    if hub is None:
        raise SiroccoError(not_here + "; nor a Hugging Face Hub id (org/repo, org/repo:QUANT, org/repo/file.gguf)")
    try:
        return resolve_hub_name(hub)
    except CheckpointError as e:
        raise CheckpointError(f"{not_here}; as a Hugging Face Hub id: {e}") from None


def load(name_or_path: Optional[str], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         quantize: Optional[str] = None, backend: Optional[str] = "auto", prefill: Prefill = "per_sequence") -> Loaded:
    """A model and its tokenizer from a folder, a bundled name, or the default (see ``model_folder``), or the
    random demo model, put on ``backend`` by the conversion pass (``backends.attach``: "auto" is the C++ kernels
    for CPU models of 256 MiB or more, else the plain-PyTorch reference) with the pre-fill attention path
    ``prefill``. Bundled weights are stored in bfloat16 and converted to ``dtype`` while loading.

    ``quantize`` (a mix: ``q4_K_M``, ``q5_K_M``, ``q6_K``, ``q3_K_M``, ``q2_K``, ``iq4_xs``, ``q8_0``/``int8``,
    ``q4_0``/``int4``; backends/quant/convert.py): the linear layers quantized, each weight as it is read from a
    checkpoint folder (the float model never exists whole; ``checkpoint.read_model``), a GGUF file's float ones
    and the demo model's after reading. The bytes before and after are logged and kept in ``Loaded.quantized``."""
    if name_or_path == DEMO:
        model, tokenizer = _demo(dtype, device)
        parts, source = ModelParts(model, {}), f"{DEMO} (random weights, {dtype}, {device})"
    else:
        path = model_folder(name_or_path)
        if is_gguf(path):
            gguf = GGUFFile(path)                   # the header read once for both, the tokenizer checked first
            tokenizer = gguf.tokenizer()
            parts, source = read_model(gguf, dtype, device), f"{path} (GGUF, {dtype}, {device})"
        else:
            parts = read_model(path, dtype=dtype, device=device, quantize=quantize)
            tokenizer, source = load_tokenizer(path), f"{path} ({dtype}, {device})"
    conversion = backends.attach(parts.model, backend, quantize=quantize, blocks=parts.blocks, prefill=prefill)
    return Loaded(parts.model, tokenizer, source, conversion.quantized, conversion.backend)


def _demo(dtype: torch.dtype, device: torch.device | str) -> tuple[Transformer, Tokenizer]:
    tok_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tokenizer = load_tokenizer(tok_file)
    model = build_model(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024), dtype=dtype,
                        device=device, seed=0)
    log.warning("no trained model given: using a RANDOMLY INITIALISED tiny model (%s) with Mistral's v1 "
                "tokenizer; its text is noise. Pass --model PATH for a real checkpoint.", DEMO)
    return model, tokenizer
