"""Incremental detokenization with stop strings, for streaming.

Decoding token by token is wrong for sentencepiece (a piece's leading space depends on what precedes it) and
for byte-fallback tokens (a character may span several tokens). So the tracker decodes a short window of
ids twice, with and without the newest ones, and emits only the difference, and only once it no longer ends
in an incomplete character (U+FFFD). Worked example with ids [..., "▁the", "▁caf", <0xC3>, <0xA9>]:
pushing <0xC3> decodes to "the caf\ufffd" (held back), pushing <0xA9> to "the café": emits "é".

Text that might be the start of a stop string is held back too, so a stream never shows text the final
result does not contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tokenizer.base import Tokenizer

_CONTEXT = 4     # prompt tokens decoded before the first generated one, to get its leading space right


class TextTracker:
    """The text of one generation. ``push(id)`` returns (new text safe to show, stop string hit?)."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_tokens[-_CONTEXT:])
        self.prefix_offset = 0                # ids[prefix_offset:read_offset] is the decoded context
        self.read_offset = len(self.ids)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""                        # everything decoded so far (cut before a stop string once hit)
        self.emitted = 0                      # characters of ``text`` already returned

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if after.endswith("\ufffd"):
            return "", False                  # a character is still incomplete: wait for its next byte
        # if the context decoded differently, decode the new ids alone
        delta = after[len(before):] if after.startswith(before) else self.tokenizer.decode(self.ids[self.read_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self.hold), False

    def finish(self) -> str:
        """The rest of the text (held-back characters included) once the sequence is done."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece
