"""Constrained generation: a row's tokens follow a grammar (a JSON schema, a list of tool calls), enforced by
llguidance's token masks through the sampling seam.

    Grammar (Lark text, picklable: what SamplingParams.constraint carries to every pipeline rank)
        --processor(tokenizer, vocab)--> GrammarProcessor: a matcher per row
            fill_mask(out, draft): the packed allowed-token mask of each position (bit t % 32 of word t // 32)
            accept(tokens): advance;  finished(): nothing but EOS may follow, so the row ends

What the builders write (``json_schema_grammar``, ``tool_calls_grammar``): JSON with fixed separators, ", "
between items and ": " after keys, as Python's ``json.dumps`` writes it and as Mistral's tool calls were
trained, and no other whitespace anywhere (a permissive grammar lets a small model write spaces or newlines
until ``max_tokens``); one optional leading space, where a sentencepiece model writes its dummy prefix.

A schema keyword llguidance cannot enforce is refused (``GrammarError`` naming it), never dropped; so is a
``format`` it does not know. The vocabulary llguidance needs (every token's bytes) comes from sirocco's own
tokenizer objects (``Tokenizer.token_vocab``), built once per tokenizer and vocabulary size; a grammar is
compiled once per text (an LRU of matchers) and each row gets a copy.

Why llguidance and not xgrammar, with the measurements: docs/structured-outputs.md.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sampling import LogitsProcessor

log = logging.getLogger(__name__)

ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}
TOOL_MARKER = "[TOOL_CALLS]"       # the text a plain-template answer starts a call with (tokenizer/chat.py)
MATCHERS_CACHED = 64


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced. ``keyword``: the schema keyword at fault, where one is."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


@dataclass(frozen=True)
class Grammar:
    """A ``Constraint`` (sampling.py): llguidance's Lark text. ``kind`` says what the text describes
    ("json", "tool_calls"), for logs and for the caller reading the answer."""

    lark: str
    kind: str = "json"

    def processor(self, tokenizer: Any, vocab_size: int) -> GrammarProcessor:
        return GrammarProcessor(compiled(self, tokenizer, vocab_size).deep_copy())


class GrammarProcessor(LogitsProcessor):
    """One row's matcher behind the ``LogitsProcessor`` seam."""

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.failed = False

    def fill_mask(self, out: torch.Tensor, draft: Sequence[int]) -> bool:
        """Row j of ``out``: what may follow the draft's first j tokens. The matcher takes the draft
        tentatively and rolls it back; rows past the first token the grammar refuses copy that row's mask (the
        sampler rejects the draft there, so they are never read)."""
        m = self.matcher
        nbytes = out.shape[1] * out.element_size()
        m.unsafe_compute_mask_ptr(out[0].data_ptr(), nbytes)
        if not draft:
            return True
        valid = m.validate_tokens(list(draft))
        for j in range(valid):
            m.consume_token(int(draft[j]))
            m.unsafe_compute_mask_ptr(out[j + 1].data_ptr(), nbytes)
        if valid + 1 < out.shape[0]:
            out[valid + 1:] = out[valid]
        if valid:
            m.rollback(valid)
        return True

    def accept(self, tokens: Sequence[int]) -> None:
        if self.failed:
            return
        if not self.matcher.consume_tokens([int(t) for t in tokens]):
            # only a token the mask allowed is ever sampled, so this is a bug: end the row, say why
            self.failed = True
            log.error("grammar: the matcher refused tokens %s: %s", list(tokens),
                      (self.matcher.get_error().strip().splitlines() or ["?"])[0])

    def finished(self) -> bool:
        return self.failed or self.matcher.is_stopped()


# -- the vocabulary and compiled grammars, cached ------------------------------------------------------------------
_lock = threading.Lock()
_vocabs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()      # tokenizer -> {vocab_size: LLTokenizer}
# (id(LLTokenizer), lark) -> (that LLTokenizer, matcher): holding the LLTokenizer keeps its id from being reused
_matchers: OrderedDict = OrderedDict()


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's tokenizer for ``tokenizer`` with masks of ``vocab_size`` bits (the model's, which may pad the
    tokenizer's vocabulary), built once (a second or so for a 131k vocabulary) and cached."""
    import llguidance

    if tokenizer is None:
        raise GrammarError("constrained generation needs a tokenizer")
    with _lock:
        per = _vocabs.setdefault(tokenizer, {})
        if vocab_size in per:
            return per[vocab_size]
    vocab = tokenizer.token_vocab()
    if vocab.hf_json is not None:
        built = llguidance.LLTokenizer(vocab.hf_json, n_vocab=vocab_size, eos_token=tokenizer.eos_id)
    else:
        tokens = list(vocab.tokens) + [b""] * max(0, vocab_size - len(vocab.tokens))
        built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokens, vocab.special, tokenizer.eos_id,
                                                                          tokenizer.bos_id, vocab.encode)),
                                       n_vocab=vocab_size)
    with _lock:
        return _vocabs.setdefault(tokenizer, {}).setdefault(vocab_size, built)


class _Vocab:
    """What ``llguidance.TokenizerWrapper`` reads of a tokenizer."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: int, bos: int, encode: Any):
        self.tokens, self.special_token_ids, self.eos_token_id, self.bos_token_id = tokens, special, eos, bos
        self.encode = encode

    def __call__(self, text: bytes) -> list[int]:
        return self.encode(text)


def compiled(grammar: Grammar, tokenizer: Any, vocab_size: int) -> Any:
    """A fresh matcher of ``grammar`` (cached: copy it before use). Raises ``GrammarError`` if llguidance cannot
    build it, naming the keyword where the error is an unsupported one."""
    import llguidance

    lltok = grammar_tokenizer(tokenizer, vocab_size)
    key = (id(lltok), grammar.lark)
    with _lock:
        if key in _matchers:
            _matchers.move_to_end(key)
            return _matchers[key][1]
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
    if matcher.is_error():
        raise _explain(matcher.get_error())
    with _lock:
        _matchers[key] = (lltok, matcher)
        while len(_matchers) > MATCHERS_CACHED:
            _matchers.popitem(last=False)
    return matcher


def check(grammar: Grammar, tokenizer: Any, vocab_size: int) -> None:
    """Raise ``GrammarError`` if ``grammar`` cannot be enforced with this tokenizer (and compile it meanwhile)."""
    compiled(grammar, tokenizer, vocab_size)


def validate(grammar: Grammar) -> None:
    """Raise ``GrammarError`` if ``grammar`` cannot be enforced with any tokenizer (no tokenizer needed: what a
    command line checks while it parses its options)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar.lark))
    if error:
        raise _explain(error)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


def _explain(error: str) -> GrammarError:
    """llguidance's error as a message that names the keyword."""
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    first = re.sub(r"^.*?(Unimplemented keys|Unknown format|Unsatisfiable schema)", r"\1", first)
    m = _UNIMPLEMENTED.search(error)
    if m:
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        return GrammarError(f"the JSON schema uses {', '.join(repr(k) for k in keys)}, which sirocco cannot "
                            f"enforce", keyword=keys[0] if keys else None)
    m = re.search(r"Unknown format: (\S+)", error)
    if m:
        return GrammarError(f"the JSON schema uses 'format': {m.group(1)!r}, which sirocco cannot enforce",
                            keyword="format")
    return GrammarError(f"the JSON schema cannot be enforced: {first}")


# -- builders ------------------------------------------------------------------------------------------------------
def _json_rule(schema: Any) -> str:
    """An llguidance ``%json`` body: the schema with sirocco's fixed separators."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def prepare_schema(schema: Any, strict: bool = False, where: str = "schema") -> dict:
    """A user's JSON schema, checked for what llguidance's options would hide, and with
    ``additionalProperties: false`` filled in on every object schema that does not say, where ``strict`` (what
    OpenAI's strict mode requires anyway). Raises ``GrammarError`` naming the problem."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    if "x-guidance" in schema:
        raise GrammarError(f"{where} uses 'x-guidance', which this server sets itself", keyword="x-guidance")
    return _closed(schema) if strict else schema


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on each object schema that leaves it out."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUBSCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: _closed(s) for name, s in out[k].items()}
    for k in _SUBSCHEMA_LISTS + _SUBSCHEMAS:
        if k in out:
            out[k] = _closed(out[k])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: Any, strict: bool = False) -> Grammar:
    """A JSON value valid against ``schema`` (a dict), compact, after one optional space."""
    schema = prepare_schema(schema, strict)
    return Grammar(f'start: " "? value\nvalue: {_json_rule(schema)}\n', "json")


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's ``json_object``), compact."""
    return json_schema_grammar({"type": "object"})


@dataclass
class Function:
    """A tool's function as the grammar sees it: its name and its parameters' schema."""

    name: str
    parameters: dict
    strict: bool = False


def tool_calls_grammar(functions: Sequence[Function], choice: str, parallel: bool = True,
                       marker: int | None = None, text_schema: dict | None = None) -> Grammar:
    """What an answer may be when tools are offered: ``choice`` is "none" (text, never a call), "auto" (text,
    or a call list), "required" (a call list) or a function's name (a list of calls of it).

    A call list is ``[{"name": NAME, "arguments": ARGS}, ...]`` (one call unless ``parallel``) after the marker:
    the [TOOL_CALLS] control token ``marker`` (Mistral's tokenizers), or the text "[TOOL_CALLS]" (the
    plain-text template; ``marker`` None). Each ARGS is valid against its function's parameters, each its own
    JSON document (so a ``$ref`` resolves in its own schema). Text in "auto" and "none" may be anything that
    does not start with the marker; with a control token that is any text at all (text cannot spell it).
    ``text_schema``: the answer that is not a call is instead JSON valid against it (``response_format``)."""
    # Lexemes are greedy: an optional " " lexeme before the marker would be swallowed by TEXT (or by the JSON
    # after it), so the marker's leading space is part of its own lexeme, and JSON text shares the space before
    # both branches.
    marker_rule = f"<[{marker}]>" if marker is not None else "MARKER"
    uses_marker_text = marker is None and choice != "none" and not (choice == "auto" and text_schema is not None)
    lines = [r"MARKER: / ?\[TOOL_CALLS\]/"] if uses_marker_text else []
    if choice in ("none", "auto"):
        if text_schema is not None:
            lines.append(f"text_value: {_json_rule(prepare_schema(text_schema))}")
        elif marker is None:
            lines.append(r"TEXT: /(?s:.*)/ & ~/ ?\[TOOL_CALLS\](?s:.*)/")
        else:
            lines.append(r"TEXT: /(?s:.*)/")
    if choice == "none":
        return Grammar(("start: \" \"? text_value\n" if text_schema is not None else "start: TEXT\n")
                       + "\n".join(lines) + "\n", "tool_calls")
    chosen = list(functions) if choice in ("auto", "required") else [f for f in functions if f.name == choice]
    if not chosen:
        raise GrammarError(f"no function named {choice!r} among the tools")
    call_rules = [f"call_{i}" for i in range(len(chosen))]
    calls = f'"[" call ({_lark_string(ITEM_SEPARATOR)} call)* "]"' if parallel else '"[" call "]"'
    if choice != "auto":
        start = f'{marker_rule} " "? calls'
    elif text_schema is None:
        start = f'TEXT | {marker_rule} " "? calls'
    elif marker is None:
        start = f'" "? (text_value | {_lark_string(TOOL_MARKER)} " "? calls)'
    else:
        start = f'" "? text_value | {marker_rule} " "? calls'
    lines = [f"start: {start}", f"calls: {calls}", f"call: {' | '.join(call_rules)}"] + lines
    for rule, f in zip(call_rules, chosen, strict=True):
        head = '{"name": ' + json.dumps(f.name, ensure_ascii=False) + ', "arguments": '
        lines.append(f'{rule}: {_lark_string(head)} args_{rule} "}}"')
        lines.append(f"args_{rule}: {_json_rule(prepare_schema(f.parameters, f.strict, 'parameters'))}")
    return Grammar("\n".join(lines) + "\n", "tool_calls")
