"""A Hugging Face ``tokenizer.json``, read with the ``tokenizers`` library.

BOS and EOS are the ``bos_token`` / ``eos_token`` of ``tokenizer_config.json`` (or ``special_tokens_map.json``)
beside the file, else the tokens ``<s>`` and ``</s>`` if the vocabulary has them. Special tokens written in a
text are encoded as text, as sentencepiece does, so a prompt cannot forge a control token. The folder's Jinja
``chat_template`` is not used: chat prompts follow Mistral's instruct format (chat.py), with [INST]/[/INST] as
control tokens when the vocabulary has them as special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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

    def token_vocab(self) -> TokenVocab:
        return TokenVocab([], [], lambda text: self.tok.encode(text.decode("utf-8", "replace"),
                                                               add_special_tokens=False).ids,
                          hf_json=self.tok.to_str())


def _configured_token(folder: Path, key: str) -> tuple[Optional[str], str]:
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
