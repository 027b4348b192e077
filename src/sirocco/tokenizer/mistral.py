"""Mistral's own tokenizer files, read by mistral-common: ``tekken.json`` (tiktoken-style byte BPE, 131k
tokens) and the versioned sentencepiece models ``tokenizer.model.v1``/``.v3``/... (also named like
``mistral_instruct_tokenizer_240323.model.v3``). The version in the name selects the instruct format, so chat
prompts are encoded by mistral-common exactly as Mistral's models were trained on them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import TokenizerError
from . import chat
from .base import Tokenizer, first_line


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.source = str(path)
        quiet = logging.getLogger("mistral_common")
        if quiet.level == logging.NOTSET:      # its INFO lines about tekken's 1000 special tokens drown ours
            quiet.setLevel(logging.WARNING)
        try:
            self.mistral = MistralTokenizer.from_file(str(path))
        except Exception as e:     # json, sentencepiece, or mistral-common's own complaint about the file
            raise TokenizerError(f"{path}: mistral-common cannot read this tokenizer file "
                                 f"({type(e).__name__}: {first_line(e)})") from None
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        family = "tekken" if "tekken" in path.name else "sentencepiece"
        self.kind = f"mistral-common {self.raw.version.value}, {family}"
        self.bos_id, self.eos_id, self.vocab_size = self.raw.bos_id, self.raw.eos_id, self.raw.n_words
        self._setup()

    def _encode_text(self, text: str) -> list[int]:
        return self.raw.encode(text, bos=False, eos=False)

    def _decode_text(self, ids: list[int]) -> str:
        return self.raw.decode(ids)

    def _longest_piece(self) -> Optional[int]:
        model: Any = getattr(self.raw, "_model", None)   # what mistral-common encodes with
        if hasattr(model, "serialized_model_proto"):     # a SentencePieceProcessor
            from .sentencepiece_model import longest_piece
            return longest_piece(model, self.source)
        if hasattr(model, "token_byte_values"):          # tekken's tiktoken.Encoding: byte-level BPE, no normalizer
            pieces = model.token_byte_values()
            if len({p for p in pieces if len(p) == 1}) < 256:     # a byte it lacks could not be encoded
                return None
            return max(len(p) for p in pieces)           # bytes: at least as many as the characters they hold
        return None

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """mistral-common's encoding of the conversation (``encode_chat_completion``) for this file's instruct
        version; tools and tool results work too if given in mistral-common's message format."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        chat.check_messages(messages)
        try:
            request = ChatCompletionRequest(messages=list(messages))  # type: ignore[type-var]
            return list(self.mistral.encode_chat_completion(request).tokens)
        except Exception as e:     # pydantic's validation or mistral-common's own checks of the conversation
            raise TokenizerError(f"chat: mistral-common rejects these messages ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    errors = getattr(e, "errors", None)       # pydantic: say which field of which message, not just how many
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    return f"{type(e).__name__}: {first_line(e)}"
