"""Mistral's own tokenizer files, read by mistral-common: ``tekken.json`` (tiktoken-style byte BPE, 131k
tokens) and the versioned sentencepiece models ``tokenizer.model.v1``/``.v3``/... (also named like
``mistral_instruct_tokenizer_240323.model.v3``). The version in the name selects the instruct format, so chat
prompts are encoded by mistral-common exactly as Mistral's models were trained on them.

Tools: where the vocabulary has Mistral's tool control tokens ([AVAILABLE_TOOLS], [TOOL_CALLS],
[TOOL_RESULTS]: v2 and later), a conversation with tools, tool calls and tool results is built from
mistral-common's own request objects (``ChatCompletionRequest``, ``Tool``, ``AssistantMessage`` with
``ToolCall``, ``ToolMessage``), so its ids are Mistral's token for token; the model then answers a call with
[TOOL_CALLS] and a JSON list of ``{"name", "arguments"}``. From v11 on, calls are written as
``[TOOL_CALLS]name[ARGS]{...}``, a format sirocco does not constrain yet: such a tokenizer refuses tools.
Without the tokens (v1), tools use the plain-text template of chat.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TokenizerError
from . import chat
from .base import SPECIAL, Tokenizer, TokenVocab, first_line, sentencepiece_vocab

TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path):
        from mistral_common.tokens.tokenizers.base import TokenizerVersion
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
        self.tekken = family == "tekken"
        ids = [self._special(t) for t in TOOL_TOKENS]
        if all(i is not None for i in ids):
            self.tool_calls_id = ids[2]
            if self.raw.version >= TokenizerVersion.v11:
                self.tools_unsupported = (f"{path.name} is a {self.raw.version.value} tokenizer, whose tool calls are "
                                          f"written [TOOL_CALLS]name[ARGS]{{...}}; sirocco writes and constrains "
                                          f"Mistral's tool calls up to v7 (a JSON list after [TOOL_CALLS])")
        self._setup()

    def _special(self, name: str) -> int | None:
        try:
            i = int(self.raw.get_special_token(name))
        except Exception:          # mistral-common raises its own exceptions for a name not in the vocabulary
            return None
        return i if self.raw.id_to_piece(i) == name else None     # sentencepiece maps unknown names to <unk>

    def token_vocab(self) -> TokenVocab:
        raw: Any = self.raw            # mistral-common's SentencePieceTokenizer or Tekkenizer
        if not self.tekken:
            return sentencepiece_vocab(raw._model)
        tokens = [SPECIAL + raw.id_to_byte_piece(i, "keep") if i < raw.num_special_tokens else raw.id_to_byte_piece(i)
                  for i in range(raw.n_words)]
        return TokenVocab(tokens, list(range(raw.num_special_tokens)),
                          lambda text: raw.encode(text.decode("utf-8", "replace"), bos=False, eos=False))

    def _encode_text(self, text: str) -> list[int]:
        return self.raw.encode(text, bos=False, eos=False)

    def _decode_text(self, ids: list[int]) -> str:
        return self.raw.decode(ids)

    def _longest_piece(self) -> int | None:
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

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """mistral-common's encoding of the conversation (``encode_chat_completion``) for this file's instruct
        version, built from its request objects; with tools where the vocabulary has the tool tokens (else
        chat.py's plain-text template, as for any tokenizer without them)."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        msgs = chat.check_messages(messages)
        uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in msgs)
        if uses_tools and self.tools_unsupported:
            raise TokenizerError(f"chat: tools: {self.tools_unsupported}")
        if uses_tools and self.tool_calls_id is None:
            return chat.instruct_ids(messages, self._encode_text, self.bos_id, self.eos_id, None, tools)
        try:
            request = ChatCompletionRequest(messages=[_message(m) for m in msgs],
                                            tools=[_tool(t) for t in tools] if tools else None)
            return list(self.mistral.encode_chat_completion(request).tokens)
        except Exception as e:     # pydantic's validation or mistral-common's own checks of the conversation
            raise TokenizerError(f"chat: mistral-common rejects these messages ({_reason(e)})") from None


def _message(m: chat.Message) -> Any:
    """A checked message as mistral-common's request object."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    if m.role == "system":
        return SystemMessage(content=m.content)
    if m.role == "user":
        return UserMessage(content=m.content)
    if m.role == "tool":
        return ToolMessage(content=m.content, tool_call_id=m.tool_call_id, name=m.name)
    calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                         arguments=c["function"]["arguments"]))
             for c in m.tool_calls] if m.tool_calls else None
    return AssistantMessage(content=m.content or None, tool_calls=calls, prefix=m.prefix)


def _tool(t: dict) -> Any:
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    f = t["function"]
    return Tool(function=Function(name=f["name"], description=f.get("description") or "",
                                  parameters=f.get("parameters") if f.get("parameters") is not None
                                  else chat.NO_PARAMETERS))


def _reason(e: Exception) -> str:
    errors = getattr(e, "errors", None)       # pydantic: say which field of which message, not just how many
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    return f"{type(e).__name__}: {first_line(e)}"
