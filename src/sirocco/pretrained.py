"""Which model a name means and loading it with its tokenizer: a checkpoint folder (either published format), a
GGUF file (model and tokenizer from the one file), a bundled model's name, nothing (the default model), or the
random demo model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import mistral_common
import torch

from .checkpoint import GGUFFile, is_gguf, load_model, load_quantized
from .config import preset
from .errors import SiroccoError
from .model import Transformer, build_model
from .tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .backends.quant import QuantReport

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


def model_folder(name_or_path: Optional[str]) -> Path:
    """The checkpoint that ``--model`` names: a folder or a ``.gguf`` file, a bundled model's name, or None for the
    default (``sirocco-tiny``). A path that exists wins over a bundled model of the same name."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path in bundled_models():
        path = BUNDLED / name_or_path
        log.info("bundled model %s: %s", name_or_path, path)
    if not path.exists():
        raise SiroccoError(f"--model {name_or_path}: no such folder or file, and not a bundled model "
                           f"({', '.join(bundled_models() + [DEMO])})")
    return path


def load(name_or_path: Optional[str], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         quantize: Optional[str] = None) -> Loaded:
    """A model and its tokenizer from a folder, a bundled name, or the default (see ``model_folder``), or the
    random demo model. Bundled weights are stored in bfloat16 and converted to ``dtype`` while loading.

    ``quantize`` (``int8``/``int4``, or ``q8_0``/``q4_0``): the linear layers quantized as ``backends.quant.attach``
    does, each weight as it is read from a checkpoint folder (``checkpoint.load_quantized``: the float model never
    exists whole); a GGUF file's or the demo model's after loading. The bytes before and after are logged and
    kept in ``Loaded.quantized``."""
    if name_or_path == DEMO:
        return _quantized(_demo(dtype, device), quantize)
    path = model_folder(name_or_path)
    if is_gguf(path):
        gguf_file = GGUFFile(path)                  # read the header once for both
        loaded = Loaded(gguf_file.model(dtype, device), gguf_file.tokenizer(), f"{path} (GGUF, {dtype}, {device})")
        return _quantized(loaded, quantize)
    report: Optional[QuantReport] = None
    if quantize:
        model, report = load_quantized(path, quantize, dtype=dtype, device=device)
    else:
        model = load_model(path, dtype=dtype, device=device)
    return Loaded(model, load_tokenizer(path), f"{path} ({dtype}, {device})", report)


def _quantized(loaded: Loaded, quantize: Optional[str]) -> Loaded:
    """``loaded`` with its model quantized after loading (``attach``), where ``quantize`` asks."""
    from .backends.quant import attach_if
    loaded.quantized = attach_if(loaded.model, quantize)
    return loaded


def _demo(dtype: torch.dtype, device: torch.device | str) -> Loaded:
    tok_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tokenizer = load_tokenizer(tok_file)
    model = build_model(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024), dtype=dtype,
                        device=device, seed=0)
    log.warning("no trained model given: using a RANDOMLY INITIALISED tiny model (%s) with Mistral's v1 "
                "tokenizer; its text is noise. Pass --model PATH for a real checkpoint.", DEMO)
    return Loaded(model, tokenizer, f"{DEMO} (random weights, {dtype}, {device})")
