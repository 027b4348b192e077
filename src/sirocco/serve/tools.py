"""An answer that may be tool calls, read as it streams: OpenAI's ``content`` deltas, or its ``tool_calls`` deltas.

An answer is a call list when it starts with the marker: Mistral's [TOOL_CALLS] control token (the first token;
it decodes to no text), or the text "[TOOL_CALLS]" of the plain-text template (after at most one space; text
that could still become the marker is held back until it cannot). The call list is the JSON the grammar
allowed (generate/grammar.py): ``[{"name": NAME, "arguments": ARGS}, ...]`` with ", " and ": " separators.
Each call becomes, in OpenAI's streamed shape,

    {"index": k, "id": "a1B2c3D4e", "type": "function", "function": {"name": NAME, "arguments": ""}}
    {"index": k, "function": {"arguments": "<the next piece of ARGS' text>"}}      (as ARGS grows)

and the non-streamed answer is the same deltas folded: ``message.tool_calls`` with each call's whole
ARGS text (cut short, and so not valid JSON, where the answer stopped at ``max_tokens``). Call ids are 9
letters and digits, Mistral's format, which its v3 prompts carry back.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from ..generate.grammar import TOOL_MARKER

ID_CHARS = string.ascii_letters + string.digits
_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


def call_id() -> str:
    """A new call id: 9 letters and digits.

    >>> len(call_id()), call_id().isalnum()
    (9, True)
    """
    return "".join(secrets.choice(ID_CHARS) for _ in range(9))


def value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at ``text[start]`` ends (the index after it), or None if it is incomplete.
    A bare scalar ends where the call's closing brace follows it.

    >>> value_end('{"a": "}"}}', 0), value_end('{"a": [1, ', 0), value_end('12}', 0)
    (10, None, 2)
    """
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:
                return i
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scan_calls(text: str) -> list[tuple[str, str, bool]]:
    """The calls of a (possibly unfinished) call list: (name, arguments text so far, arguments complete).

    >>> scan_calls(' [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": ')
    [('f', '{"x": 1}', True), ('g', '{"y": ', False)]
    """
    out: list[tuple[str, str, bool]] = []
    i = len(text) - len(text.lstrip(" "))
    if not text.startswith("[", i):
        return out
    i += 1
    while True:
        m = _HEAD.match(text, i)
        if m is None:
            return out
        name = json.loads(f'"{m.group(1)}"')
        end = value_end(text, m.end())
        if end is None:
            out.append((name, text[m.end():], False))
            return out
        out.append((name, text[m.end():end], True))
        i = end + 1                                   # past the call's "}"
        if not text.startswith(", ", i):
            return out
        i += 2


@dataclass
class CallReader:
    """One choice's answer, fed event by event (``feed(token, text)`` returns OpenAI deltas)."""

    marker_id: int | None                  # the [TOOL_CALLS] control token, or None for the text marker
    is_call: bool | None = None            # None while undecided
    content: str = ""
    calls: list[dict] = field(default_factory=list)     # OpenAI's tool_calls, as streamed so far
    _held: str = ""
    _text: str = ""                                       # the call list's text (after the marker)
    _first: bool = True

    def feed(self, token: int | None, text: str) -> list[dict]:
        if self._first and token is not None:
            self._first = False
            if self.marker_id is not None:
                self.is_call = token == self.marker_id
        if self.is_call is None:                          # the text marker, not decided yet
            self._held += text
            head = self._held[1:] if self._held.startswith(" ") else self._held
            if head.startswith(TOOL_MARKER):
                self.is_call, text = True, head[len(TOOL_MARKER):]
            elif TOOL_MARKER.startswith(head):
                return []
            else:
                self.is_call, text = False, self._held
        if not self.is_call:
            self.content += text
            return [{"content": text}] if text else []
        self._text += text
        return self._deltas()

    def finish(self) -> list[dict]:
        """What is still held back once the answer is complete."""
        if self.is_call is None and self._held:
            self.is_call = False
            self.content += self._held
            return [{"content": self._held}]
        return []

    def _deltas(self) -> list[dict]:
        out = []
        for k, (name, args, _) in enumerate(scan_calls(self._text)):
            if k == len(self.calls):
                self.calls.append({"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}})
                out.append({"tool_calls": [{"index": k, **self.calls[k], "function": {"name": name, "arguments": ""}}]})
            sent = self.calls[k]["function"]["arguments"]
            if len(args) > len(sent):
                self.calls[k]["function"]["arguments"] = args
                out.append({"tool_calls": [{"index": k, "function": {"arguments": args[len(sent):]}}]})
        return out
