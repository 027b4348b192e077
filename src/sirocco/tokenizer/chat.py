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
``"prefix": True`` (a reply to continue: it gets no EOS). Tool calls need a Mistral tokenizer file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..errors import TokenizerError

ROLES = ("system", "user", "assistant")
JOIN = "\n\n"


@dataclass
class Message:
    role: str
    content: str
    prefix: bool = False


def check_messages(messages: Sequence[dict], roles: Sequence[str] = ROLES + ("tool",)) -> list[Message]:
    """Messages as dicts with a known role and string content; the error names the message and the field."""
    if isinstance(messages, (str, bytes, dict)) or not messages:
        raise TokenizerError("chat: messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"chat: message {i} is a {type(m).__name__}, not a dict with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise TokenizerError(f"chat: message {i} has role {role!r}; expected one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise TokenizerError(f"chat: message {i} ({role}) needs a string 'content', got "
                                 f"{type(content).__name__}")
        out.append(Message(str(role), content, bool(m.get("prefix", False))))
    return out


def normalise(messages: Sequence[dict]) -> tuple[Optional[str], list[Message]]:
    """The system prompt (or None) and the user/assistant turns, merged and checked as described above."""
    msgs = check_messages(messages, ROLES)
    system = [m.content for m in msgs if m.role == "system"]
    turns: list[Message] = []
    for prev, m in zip([None, *msgs], msgs):
        if m.role == "system":
            continue
        if prev is not None and prev.role == m.role:     # a system message in between keeps turns apart
            turns[-1] = Message(m.role, turns[-1].content + JOIN + m.content, turns[-1].prefix or m.prefix)
        else:
            turns.append(m)
    if not turns or turns[0].role != "user":
        turns.insert(0, Message("user", ""))
    if any(m.prefix for m in turns[:-1]):
        raise TokenizerError("chat: only the last message may be an assistant 'prefix' to continue")
    last = msgs[-1]
    if len(msgs) > 1 and last.role != "user" and not (last.role == "assistant" and last.prefix):
        raise TokenizerError(f"chat: the last message must be the user's (the model answers it), got "
                             f"{last.role!r}; mark an assistant reply to continue with \"prefix\": True")
    return (JOIN.join(system) if system else None), turns


def instruct_ids(messages: Sequence[dict], encode: Callable[[str], list[int]], bos_id: int, eos_id: int,
                 inst_ids: Optional[tuple[int, int]] = None) -> list[int]:
    """Prompt ids for ``messages``. ``encode`` maps text to ids without BOS/EOS; ``inst_ids`` are the
    [INST] and [/INST] control token ids, or None for the v1 text format."""
    system, turns = normalise(messages)
    users = [i for i, m in enumerate(turns) if m.role == "user"]
    with_system = users[0] if inst_ids is None else users[-1]
    ids = [bos_id]
    for i, m in enumerate(turns):
        if m.role == "user":
            content = system + JOIN + m.content if system and i == with_system else m.content
            if inst_ids is None:
                ids += encode(f"[INST] {content} [/INST]")
            else:
                ids += [inst_ids[0], *encode(content), inst_ids[1]]
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
