"""Chat messages -> prompt ids in Mistral's instruct format, for tokenizers that mistral-common does not drive
(a plain sentencepiece ``tokenizer.model``, a Hugging Face ``tokenizer.json``). It gives the same ids as
mistral-common for the same messages; tests/test_tokenizer.py checks this against mistral-common itself.

Format v1 (Mistral 7B Instruct v0.1/v0.2, Mixtral 8x7B Instruct), built from text pieces:

    <s> [INST] {system}\\n\\n{user 1} [/INST] {assistant 1} </s> [INST] {user 2} [/INST]

Every "[INST] {user} [/INST]" and every assistant reply is encoded on its own, without BOS, so each starts with
sentencepiece's dummy-prefix space: the ids differ from those of the whole string encoded at once. The system
prompt goes in front of the first user message.

When the vocabulary has [INST] and [/INST] as control tokens (v2/v3, e.g. a Hugging Face Mistral 7B v0.3
folder), their ids are used instead of text, as in mistral-common's v2/v3:

    <s> [INST] {user 1} [/INST] {assistant 1} </s> [INST] {system}\\n\\n{user 2} [/INST]

with the system prompt in front of the last user message and trailing spaces cut from assistant replies.

Normalisation, as mistral-common does it: system messages are joined with a blank line into one system
prompt; messages of one role that follow each other directly are joined with a blank line (a system message
between them keeps them apart); a conversation that starts with the
assistant gets an empty user message first. The last message must be the user's, or an assistant message with
``"prefix": True`` (a reply to continue: it gets no EOS), or a tool result.

Tools, for a tokenizer without Mistral's tool control tokens (the bundled models, Mistral v1 files, plain
``tokenizer.model`` and ``tokenizer.json`` files): a plain-text template that follows Mistral's v3 layout, each
control token written as its text. The tools (OpenAI's objects, as mistral-common dumps them) go before the
last user turn; an assistant's calls and each tool result stay where they are:

    <s> [INST] {user 1} [/INST] [TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}, "id": "a1b2c3d4e"}] </s>
        [TOOL_RESULTS] {"content": 3, "call_id": "a1b2c3d4e"} [/TOOL_RESULTS] {assistant} </s>
        [AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "f", ...}}] [/AVAILABLE_TOOLS]
        [INST] {user 2} [/INST]

Each bracketed part is encoded on its own, like the turns. The model answers a call with the text
``[TOOL_CALLS]`` and a JSON list of ``{"name", "arguments"}``, then EOS; a result's content and a call's
arguments are written as JSON when they parse as JSON, as mistral-common does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TokenizerError

ROLES = ("system", "user", "assistant")
JOIN = "\n\n"
NO_PARAMETERS = {"type": "object", "properties": {}}     # a function declared without parameters takes none


@dataclass
class Message:
    role: str
    content: str
    prefix: bool = False
    tool_calls: list[dict] | None = None       # an assistant's: [{"id", "type", "function": {name, arguments}}]
    tool_call_id: str | None = None            # a tool result's
    name: str | None = None                    # a tool result's function name, where given

    @property
    def plain(self) -> bool:
        """A text turn of the user or the assistant (the kind that merges with a neighbour of its role)."""
        return self.role in ("user", "assistant") and not self.tool_calls


def check_messages(messages: Sequence[dict], roles: Sequence[str] = ROLES + ("tool",)) -> list[Message]:
    """Messages as dicts with a known role and string content (an assistant's may be empty or None when it
    has ``tool_calls``); the error names the message and the field."""
    if isinstance(messages, (str, bytes, dict)) or not messages:
        raise TokenizerError("chat: messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"chat: message {i} is a {type(m).__name__}, not a dict with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise TokenizerError(f"chat: message {i} has role {role!r}; expected one of {', '.join(roles)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            _check_calls(calls, i)
            if content:
                raise TokenizerError(f"chat: message {i} (assistant) has both 'content' and 'tool_calls'; Mistral's "
                                     "format writes one or the other")
            content = ""
        if not isinstance(content, str):
            raise TokenizerError(f"chat: message {i} ({role}) needs a string 'content', got "
                                 f"{type(content).__name__}")
        call_id = m.get("tool_call_id") if role == "tool" else None
        if call_id is not None and not isinstance(call_id, str):
            raise TokenizerError(f"chat: message {i} (tool) has a 'tool_call_id' that is not a string")
        name = m.get("name") if role == "tool" and isinstance(m.get("name"), str) else None
        out.append(Message(str(role), content, bool(m.get("prefix", False)), calls or None, call_id, name))
    return out


def _check_calls(calls: Any, i: int) -> None:
    if not isinstance(calls, list):
        raise TokenizerError(f"chat: message {i} (assistant) has 'tool_calls' that is not a list")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)
                and isinstance(c.get("id"), str)):
            raise TokenizerError(f"chat: message {i} (assistant) tool_calls[{j}] must be {{'id': str, 'type': "
                                 "'function', 'function': {'name': str, 'arguments': str}}")


def normalise(messages: Sequence[dict], roles: Sequence[str] = ROLES) -> tuple[str | None, list[Message]]:
    """The system prompt (or None) and the turns, merged and checked as described above."""
    msgs = check_messages(messages, roles)
    system = [m.content for m in msgs if m.role == "system"]
    turns: list[Message] = []
    for prev, m in zip([None, *msgs], msgs, strict=False):
        if m.role == "system":
            continue
        # a system message in between keeps turns apart; calls and results never merge
        if prev is not None and prev.role == m.role and prev.plain and m.plain:
            turns[-1] = Message(m.role, turns[-1].content + JOIN + m.content, turns[-1].prefix or m.prefix)
        else:
            turns.append(m)
    if not turns or turns[0].role != "user":
        turns.insert(0, Message("user", ""))
    if any(m.prefix for m in turns[:-1]):
        raise TokenizerError("chat: only the last message may be an assistant 'prefix' to continue")
    last = msgs[-1]
    if len(msgs) > 1 and last.role not in ("user", "tool") and not (last.role == "assistant" and last.prefix):
        raise TokenizerError(f"chat: the last message must be the user's or a tool result (the model answers it), "
                             f"got {last.role!r}; mark an assistant reply to continue with \"prefix\": True")
    return (JOIN.join(system) if system else None), turns


def _as_json(text: str) -> Any:
    """A call's arguments or a result's content: its JSON value where it is JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def tools_json(tools: Sequence[dict]) -> str:
    """OpenAI's tool objects as mistral-common writes them between [AVAILABLE_TOOLS] and [/AVAILABLE_TOOLS]."""
    out = []
    for t in tools:
        f = t["function"]
        params = f.get("parameters") if f.get("parameters") is not None else NO_PARAMETERS
        out.append({"type": "function", "function": {"name": f["name"], "description": f.get("description") or "",
                                                     "parameters": params}})
    return json.dumps(out, ensure_ascii=False)


def instruct_ids(messages: Sequence[dict], encode: Callable[[str], list[int]], bos_id: int, eos_id: int,
                 inst_ids: tuple[int, int] | None = None, tools: Sequence[dict] | None = None) -> list[int]:
    """Prompt ids for ``messages``. ``encode`` maps text to ids without BOS/EOS; ``inst_ids`` are the
    [INST] and [/INST] control token ids, or None for the v1 text format; ``tools`` (OpenAI's tool objects)
    and tool messages follow the plain-text template of the module docstring."""
    system, turns = normalise(messages, ROLES + ("tool",))
    users = [i for i, m in enumerate(turns) if m.role == "user"]
    with_system = users[0] if inst_ids is None else users[-1]
    ids = [bos_id]
    for i, m in enumerate(turns):
        if m.role == "user":
            if tools and i == users[-1]:
                ids += encode(f"[AVAILABLE_TOOLS] {tools_json(tools)} [/AVAILABLE_TOOLS]")
            content = system + JOIN + m.content if system and i == with_system else m.content
            if inst_ids is None:
                ids += encode(f"[INST] {content} [/INST]")
            else:
                ids += [inst_ids[0], *encode(content), inst_ids[1]]
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise TokenizerError(f"chat: tool message {i} needs a 'tool_call_id' (the id of the call it answers)")
            result = json.dumps({"content": _as_json(m.content), "call_id": m.tool_call_id}, ensure_ascii=False)
            ids += encode(f"[TOOL_RESULTS] {result} [/TOOL_RESULTS]")
        elif m.tool_calls:
            calls = [{"name": c["function"]["name"], "arguments": _as_json(c["function"]["arguments"]), "id": c["id"]}
                     for c in m.tool_calls]
            ids += encode(f"[TOOL_CALLS] {json.dumps(calls, ensure_ascii=False)}") + [eos_id]
        else:
            content = m.content if inst_ids is None else m.content.rstrip(" ")
            if not content:
                raise TokenizerError(f"chat: assistant message {i} is empty")
            ids += encode(content) + ([] if m.prefix else [eos_id])
    return ids


def kept_chars(messages: Sequence[dict]) -> int:
    """The characters of the messages' contents that every chat format puts in the prompt: all but the whitespace
    at either end of a content (v3 and later cut an assistant reply's trailing spaces). Each content is encoded
    inside a text at least as long (a turn, or a whole message), so with ``m = max_chars_per_token()`` a chat
    prompt has at least ``1 + ceil(kept_chars(messages) / m)`` tokens: BOS, then the contents. Contents that are
    not strings count 0 (encode_chat refuses them)."""
    return sum(len(m["content"].strip()) for m in messages
               if isinstance(m, dict) and isinstance(m.get("content"), str))
