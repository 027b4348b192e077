"""Finding and opening a tokenizer: a file, or a model folder searched in a fixed order.

In a folder, the first of these that exists wins:

1. ``tekken.json``, then other ``tekken*.json`` (last name first: the names carry a date) -- mistral-common
2. ``tokenizer.model.vN``, highest N first (``.v7m1`` counts as v7, after plain ``.v7``)    -- mistral-common
3. other ``*.model.vN`` such as ``mistral_instruct_tokenizer_240323.model.v3``, same order -- mistral-common
4. ``tokenizer.model``: a plain sentencepiece model (Hugging Face folders, sirocco's own)   -- sentencepiece
5. ``tokenizer.json``: a Hugging Face tokenizer                                             -- tokenizers

Mistral's own files come first because their names carry the instruct format's version, which a plain
``tokenizer.model`` does not; a Hugging Face Mistral folder has both ``tokenizer.model`` and ``tokenizer.json``
and the sentencepiece model is the original of the two. A file given directly is opened by its name the same
way (any other ``*.model`` is sentencepiece, any other ``*.json`` a Hugging Face tokenizer). A ``*.gguf`` file's
vocabulary is read with the file (``checkpoint.GGUFFile(path).tokenizer()``, or ``pretrained.load``), where its
container is checked as untrusted input; tokenizer/gguf_vocab.py turns its fields into a tokenizer.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import TokenizerError
from .base import Tokenizer

log = logging.getLogger(__name__)

SEARCHED = ("tekken.json", "tekken*.json", "tokenizer.model.vN", "*.model.vN", "tokenizer.model", "tokenizer.json")
_VERSIONED = re.compile(r"\.model\.v(\d+)(?:m(\d+))?$")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in ``path``: a tokenizer file, or a model folder searched as described above.

    Raises TokenizerError if there is none (naming the folder and the names looked for) or if the file
    cannot be read."""
    p = Path(path).expanduser()
    if p.is_dir():
        try:
            candidates = find_tokenizer_files(p)
        except OSError as e:
            raise TokenizerError(f"cannot list the model folder {p}: {e}") from None
        if not candidates:
            raise TokenizerError(f"no tokenizer in {p}: looked for {', '.join(SEARCHED)}")
        file = candidates[0]
        if len(candidates) > 1:
            log.info("tokenizer: %s wins over %s (see sirocco.tokenizer.load for the order)", file.name,
                     ", ".join(c.name for c in candidates[1:]))
    elif p.is_file():
        file = p
    else:
        raise TokenizerError(f"{p}: no such tokenizer file or model folder")
    tokenizer = open_tokenizer_file(file)
    log.info("tokenizer: loaded %s", tokenizer.describe())
    return tokenizer


def find_tokenizer_files(folder: Path) -> list[Path]:
    """Every tokenizer file of ``folder``, best first, in the order of the module docstring."""
    files = sorted((f for f in folder.iterdir() if f.is_file()), key=lambda f: f.name, reverse=True)
    tekken = [f for f in files if f.name == "tekken.json"] + \
             [f for f in files if _is_tekken(f.name) and f.name != "tekken.json"]
    versioned = sorted((f for f in files if _VERSIONED.search(f.name)),
                       key=lambda f: (not f.name.startswith("tokenizer.model."), _version_rank(f.name)))
    plain = [f for f in files if f.name == "tokenizer.model"] + [f for f in files if f.name == "tokenizer.json"]
    return tekken + versioned + plain


def open_tokenizer_file(file: Path) -> Tokenizer:
    """One tokenizer file, opened by the library its name calls for."""
    name = file.name
    if name.lower().endswith(".gguf"):
        raise TokenizerError(f"{file}: a GGUF file's tokenizer is read with the file: "
                             "sirocco.checkpoint.GGUFFile(path).tokenizer(), or --model FILE.gguf")
    if _is_tekken(name) or _VERSIONED.search(name):
        from .mistral import MistralCommonTokenizer
        return MistralCommonTokenizer(file)
    if name.endswith(".model"):
        from .sentencepiece_model import SentencePieceTokenizer
        return SentencePieceTokenizer(file)
    if name.endswith(".json"):
        from .hf import HFTokenizer
        return HFTokenizer(file)
    raise TokenizerError(f"{file}: not a tokenizer file name sirocco knows (tekken*.json, *.model.vN, *.model, "
                         f"*.json)")


def _is_tekken(name: str) -> bool:
    return name.startswith("tekken") and name.endswith(".json")


def _version_rank(name: str) -> tuple[int, int]:
    m: re.Match | None = _VERSIONED.search(name)
    assert m is not None
    return -int(m.group(1)), int(m.group(2) or 0)     # highest version first, then the plain before m1, m2
