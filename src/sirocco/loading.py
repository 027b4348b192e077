"""Resolving ``--model``: a checkpoint folder (either published format), a bundled model's name, or nothing
(the default model). Shared by every verb that runs a model."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import SiroccoError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO = "random-tiny"     # a randomly initialised tiny model with Mistral's v1 tokenizer (noise; for plumbing)
BUNDLED = Path(__file__).parent / "models"     # models trained by sirocco itself, shipped in the package
DEFAULT_MODEL = "sirocco-tiny"


def bundled_models() -> list[str]:
    """Names of the models shipped in the package (folders of ``sirocco/models``)."""
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "params.json").is_file()) if BUNDLED.is_dir() else []


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str          # what was loaded, from where: for logs and --json


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a checkpoint folder (consolidated or Hugging Face format) or a bundled model's name: "
                        f"{', '.join(bundled_models() + [DEMO])} (default: {DEFAULT_MODEL}; '{DEMO}' is random "
                        "weights, for plumbing)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations dtype (default float32; bfloat16 halves memory and is faster "
                        "for large models on CPUs with AVX512-BF16)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SiroccoError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SiroccoError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_for_inference(args: argparse.Namespace) -> Loaded:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    return load(args.model, dtype=dtype, device=device)


def model_folder(name_or_path: Optional[str]) -> Path:
    """The checkpoint folder that ``--model`` names: a folder, a bundled model's name, or None for the default
    (``sirocco-tiny``). A folder that exists wins over a bundled model of the same name."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path in bundled_models():
        path = BUNDLED / name_or_path
        log.info("bundled model %s: %s", name_or_path, path)
    if not path.exists():
        raise SiroccoError(f"--model {name_or_path}: no such folder, and not a bundled model "
                           f"({', '.join(bundled_models() + [DEMO])})")
    return path


def load(name_or_path: Optional[str], dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> Loaded:
    """A model and its tokenizer from a folder, a bundled name, or the default (see ``model_folder``), or the
    random demo model. Bundled weights are stored in bfloat16 and converted to ``dtype`` while loading."""
    if name_or_path == DEMO:
        return _demo(dtype, device)
    path = model_folder(name_or_path)
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer
    model = load_model(path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    return Loaded(model, tokenizer, f"{path} ({dtype}, {device})")


def _demo(dtype: torch.dtype, device: torch.device | str) -> Loaded:
    from .config import preset
    from .model import build_model
    from .tokenizer import load_tokenizer
    import mistral_common
    tok_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tokenizer = load_tokenizer(tok_file)
    model = build_model(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024), dtype=dtype,
                        device=device, seed=0)
    log.warning("no trained model given: using a RANDOMLY INITIALISED tiny model (%s) with Mistral's v1 "
                "tokenizer; its text is noise. Pass --model PATH for a real checkpoint.", DEMO)
    return Loaded(model, tokenizer, f"{DEMO} (random weights, {dtype}, {device})")
