"""A Hugging Face ``tokenizer.json``, read with the ``tokenizers`` library.

BOS and EOS are the ``bos_token`` / ``eos_token`` of ``tokenizer_config.json`` (or ``special_tokens_map.json``)
beside the file, else the tokens ``<s>`` and ``</s>`` if the vocabulary has them. Special tokens written in a
text are encoded as text, as sentencepiece does, so a prompt cannot forge a control token. The folder's Jinja
``chat_template`` is not used: chat prompts follow Mistral's instruct format (chat.py), with [INST]/[/INST] as
control tokens when the vocabulary has them as special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import TokenizerError
from .base import Tokenizer, TokenVocab, first_line

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer(Tokenizer):
    kind = "tokenizers"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.source = str(path)
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:     # the library raises a bare Exception for unreadable or malformed files
            raise TokenizerError(f"{path}: not a readable tokenizers file ({first_line(e)})") from None
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(path, "bos_token", "<s>")
        self.eos_id = self._special_id(path, "eos_token", "</s>")
        special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        if "[INST]" in special and "[/INST]" in special:
            self.inst_ids = (special["[INST]"], special["[/INST]"])
        self._setup()

    def _special_id(self, path: Path, key: str, default: str) -> int:
        token, origin = _configured_token(path.parent, key)
        if token is None:
            token, origin = default, "the default"
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{path}: the {key} {token!r} ({origin}) is not in the vocabulary; set {key} in "
                                 f"{CONFIG_FILES[0]} beside it")
        return i

    def _encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode_text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _longest_piece(self) -> int | None:
        if self.tok.truncation is not None:       # encode would cut a long text short
            return None
        return longest_piece(json.loads(self.tok.to_str()), self.tok.get_vocab(with_added_tokens=True))

    def token_vocab(self) -> TokenVocab:
        return TokenVocab([], [], lambda text: self.tok.encode(text.decode("utf-8", "replace"),
                                                               add_special_tokens=False).ids,
                          hf_json=self.tok.to_str())


# What ``longest_piece`` accepts in a tokenizer.json: the steps that keep every character of a text (or turn it
# into several), by their "type". Anything else (NFC/NFKC, Strip, StripAccents, Precompiled, BertNormalizer; the
# Whitespace, WhitespaceSplit, BertPreTokenizer and CharDelimiterSplit pre-tokenizers) may drop or merge characters.
_KEEPING_NORMALIZERS = ("Prepend", "NFD", "NFKD", "Lowercase", "ByteLevel")
_KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Punctuation", "Split")
_ANCHORS = re.compile(r"\\[AzZbB]|\^|\$")
_REGEX_SYNTAX = ".^$*+?{}[]()|\\"


def longest_piece(spec: dict, vocab: dict[str, int]) -> int | None:
    """``Tokenizer.max_chars_per_token`` of a tokenizer.json (``spec``, parsed) with its vocabulary (added tokens
    included): the longest vocabulary string, when every character of a text reaches the model. That needs
    normalizers and pre-tokenizers that drop nothing (a Replace's content at least as long as what it replaces), a
    model that never lets one unknown token stand for several characters (BPE with byte fallback, with an unfused
    unknown token, or over a byte-level alphabet it holds whole; Unigram with byte fallback), and no added token that
    swallows the whitespace beside it (lstrip/rstrip). None otherwise."""
    steps = _flatten(spec.get("normalizer"), "normalizers") + _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    if not all(_keeps_characters(s) for s in steps):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [] if not t.get("special")):
        return None
    model = spec.get("model") or {}
    byte_tokens = all(f"<0x{b:02X}>" in vocab for b in range(256))
    if model.get("type") == "BPE":
        byte_level = (any(s.get("type") == "ByteLevel" for s in steps) and not model.get("continuing_subword_prefix")
                      and not model.get("end_of_word_suffix") and _byte_level_alphabet().issubset(vocab))
        if not ((model.get("byte_fallback") and byte_tokens) or (model.get("unk_token") and not model.get("fuse_unk"))
                or byte_level):
            return None
    elif not (model.get("type") == "Unigram" and model.get("byte_fallback") and byte_tokens):
        return None                 # WordPiece and WordLevel: a word the vocabulary lacks is one [UNK]
    return max((len(piece) for piece in vocab), default=1)


def _flatten(step: Any, key: str) -> list[dict]:
    if step is None:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step.get(key, []) for s in _flatten(inner, key)]
    return [step]


def _keeps_characters(step: dict) -> bool:
    kind = step.get("type")
    if kind in _KEEPING_NORMALIZERS or kind in _KEEPING_PRE_TOKENIZERS:
        return str(step.get("behavior", "")).lower() != "removed"          # Split and Punctuation may drop matches
    if kind == "Replace":           # a string, or a regex of plain characters and anchors: its matches' length is known
        pattern = step.get("pattern") or {}
        literal: str | None = pattern.get("String")
        if literal is None and "Regex" in pattern:
            literal = _ANCHORS.sub("", pattern["Regex"])
            if set(literal) & set(_REGEX_SYNTAX):
                return False        # a class, a repetition, an alternative, an escape: a match of unknown length
        return literal is not None and len(literal) > 0 and len(step.get("content", "")) >= len(literal)
    return False


def _byte_level_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers
    return set(pre_tokenizers.ByteLevel.alphabet())


def _configured_token(folder: Path, key: str) -> tuple[str | None, str]:
    """The token named by ``key`` in the first config file that sets it, and that file's name."""
    for name in CONFIG_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            config = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{f}: not readable JSON ({e})") from None
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):            # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            return value, name
    return None, ""
