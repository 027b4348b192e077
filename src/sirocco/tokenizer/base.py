"""What every tokenizer kind shares: BOS/EOS handling, id checks, and a ``decode`` that is safe on any slice.

Sentencepiece puts a word's leading space inside its piece ("▁the") and ``encode`` adds one such space in
front of every text (the "dummy prefix"); its decoder drops the leading space of the first text piece it sees.
That is right for a whole text and wrong for a slice taken from the middle: ``[..., "▁big", "▁cat"]`` means
" big cat", yet decoding the slice ``["▁cat"]`` alone gives "cat". So ``decode`` here drops that space only
after BOS, where a text begins, and keeps it everywhere else:

    ids = encode("The big cat")            # [<s>, ▁The, ▁big, ▁cat]
    decode(ids)       == "The big cat"     # starts with BOS: the dummy prefix goes
    decode(ids[2:])   == " big cat"        # a slice: its leading space stays
    decode(ids[:2]) + decode(ids[2:]) == decode(ids)

Decoding a slice is done by putting a known anchor text in front (the ids of "a"), decoding, and cutting the
anchor's text off again, which works for every decoder that only treats the first piece specially. In general
``decode(a) + decode(b) == decode(a + b)`` whenever the split cuts no character in two and ``a`` holds some text
(BOS followed only by control tokens decodes to "" and cannot tell ``b`` that the text starts there). Byte
pieces of an incomplete character decode to U+FFFD, which is how streaming knows to wait (generate/text.py).

``max_chars_per_token()`` bounds a text's token count from below by its length alone, so that a server can refuse
a prompt far past the context without tokenizing it (tokenizing tens of megabytes takes seconds and gigabytes).
Every token ``encode`` gives stands for one piece of the vocabulary matched in the text, or for one byte of it
(byte fallback), so with ``m`` the longest piece, in characters, that text can match:

    len(encode(text, bos=False)) >= ceil(len(text) / m)
    # Mistral's v1 sentencepiece model: m = 16 ("▁" * 16), so a text of 60,000,000 characters has at least
    # 3,750,000 tokens, and one of 1,000 characters at least 63

That holds only where every character of the text reaches the vocabulary: no normalizer that drops or merges
characters (sentencepiece's ``remove_extra_whitespaces``, NFKC, a pre-tokenizer that splits whitespace away) and
no unknown token that stands for a run of characters (sentencepiece and ``tokenizers`` fuse unknown characters
into one, a WordPiece word too long for the vocabulary is one [UNK]): byte fallback, or a byte-level vocabulary,
instead. Each kind checks its file for that and answers None when it cannot promise a bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TokenizerError
from . import chat

_ANCHOR = "a"
SPECIAL = b"\xff"    # what marks a special token's bytes for a grammar engine (llguidance's convention)


@dataclass
class TokenVocab:
    """What a grammar engine needs of a vocabulary: the bytes each id stands for (a special token's are
    ``SPECIAL`` + its name, so no text can spell it), which ids are special, and an ``encode`` of text bytes
    into ids that adds nothing (no BOS, no sentencepiece dummy-prefix space). ``hf_json``: for a Hugging Face
    tokenizer, its ``tokenizer.json`` text, which the engine reads itself (``tokens`` is then empty)."""

    tokens: list[bytes]
    special: list[int]
    encode: Callable[[bytes], list[int]]
    hf_json: str | None = None


def sentencepiece_vocab(sp: Any) -> TokenVocab:
    """The ``TokenVocab`` of a ``SentencePieceProcessor``: "▁" is a space, ``<0xAB>`` its byte; control and
    unknown pieces are special. ``encode`` runs a copy of the model without the dummy prefix."""
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    tokens, special = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            tokens.append(SPECIAL + piece.encode())
            special.append(i)
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    bare = SentencePieceProcessor(model_proto=proto.SerializeToString())
    return TokenVocab(tokens, special, lambda text: bare.encode(text.decode("utf-8", "replace")))


class Tokenizer:
    """A text <-> token ids mapping with Mistral's BOS/EOS conventions. Subclasses set ``bos_id``, ``eos_id``,
    ``vocab_size``, ``source`` (the file, for logs) and ``kind``, implement ``_encode_text`` / ``_decode_text``
    (text only, no BOS/EOS handling) and call ``_setup()`` at the end of ``__init__``."""

    kind = "tokenizer"
    source: str
    bos_id: int
    eos_id: int
    vocab_size: int
    inst_ids: tuple[int, int] | None = None   # ids of the [INST] / [/INST] control tokens, if the vocab has them
    _max_chars: int | None                    # max_chars_per_token(), once computed
    # id of the [TOOL_CALLS] control token where prompts with tools are Mistral's own (mistral-common, v2 and
    # later); None: tools use chat.py's plain-text template, whose answers start with the text "[TOOL_CALLS]"
    tool_calls_id: int | None = None
    # why this tokenizer cannot take tools (a tool-call format sirocco does not write), or None
    tools_unsupported: str | None = None

    # -- what subclasses provide -----------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        """The library's own decode: drops special tokens and the first text piece's leading space."""
        raise NotImplementedError

    def _longest_piece(self) -> int | None:
        """The bound of ``max_chars_per_token`` for this file, or None (the default: no promise)."""
        return None

    def _setup(self) -> None:
        self._anchor = self._encode_text(_ANCHOR)
        self._anchor_text = self._decode_text(self._anchor)
        if not self._anchor_text or not self._decode_text(self._anchor * 2).startswith(self._anchor_text):
            self._anchor = []                     # an odd decoder: fall back to the library's decode

    # -- the public interface --------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS in front and EOS at the end if asked."""
        return [self.bos_id] * bos + self._encode_text(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """The text ``ids`` add to a document (see the module docstring: safe on any slice of a sequence).
        Special tokens (BOS, EOS, [INST], ...) decode to nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"cannot decode token ids {bad[:5]}: the vocabulary of {self.source} has "
                                 f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1})")
        if not ids:
            return ""
        if ids[0] == self.bos_id or not self._anchor:
            return self._decode_text(ids)
        text = self._decode_text(self._anchor + ids)
        if not text.startswith(self._anchor_text):
            return self._decode_text(ids)
        return text[len(self._anchor_text):]

    def max_chars_per_token(self) -> int | None:
        """The most characters of a text one token of ``encode`` stands for, or None where this tokenizer cannot
        promise a bound (see the module docstring): ``len(encode(text, bos=False)) >= ceil(len(text) / m)``.
        Computed once from the vocabulary."""
        if not hasattr(self, "_max_chars"):
            self._max_chars = self._longest_piece()
        return self._max_chars

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """Prompt ids for a conversation ([{"role": "user", "content": "..."}, ...]) ending with a user
        message (or a tool result), in Mistral's instruct format (chat.py); the model writes the assistant's
        reply next. ``tools``: OpenAI's ``[{"type": "function", "function": {name, description, parameters}}]``,
        offered to the model by chat.py's plain-text template (see its docstring)."""
        return chat.instruct_ids(messages, self._encode_text, self.bos_id, self.eos_id, self.inst_ids, tools)

    def token_vocab(self) -> TokenVocab:
        """Every token's bytes, for a grammar engine (see ``TokenVocab``)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its tokens' bytes")

    def describe(self) -> str:
        return f"{self.source} ({self.kind}, {self.vocab_size} tokens, bos {self.bos_id}, eos {self.eos_id})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def first_line(e: BaseException) -> str:
    """A library exception's message, one line of it, for an error that names the file."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
