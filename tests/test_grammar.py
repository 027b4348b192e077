"""Constrained generation (generate/grammar.py): llguidance's masks through the sampling seam, checked against
an independent JSON-schema validator (jsonschema) and against masks worked out by brute force over the vocabulary;
rows with and without constraints share steps; drafts are taken tentatively and rolled back."""

import json
from pathlib import Path

import jsonschema
import mistral_common
import pytest
import torch

from sirocco.generate import grammar
from sirocco.generate.engine import Engine
from sirocco.generate.grammar import Function, GrammarError, json_schema_grammar, tool_calls_grammar
from sirocco.generate.sampling import MASK_BITS, SamplingParams, mask_words, unpack_mask
from sirocco.pretrained import BUNDLED, load
from sirocco.tokenizer import load_tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
V1 = DATA / "tokenizer.model.v1"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN = DATA / "tekken_240911.json"

# Bounded schemas: every string has a maxLength and every array a maxItems, so a complete answer always fits
# in MAX_TOKENS (a character is at most 4 byte tokens) and a row can only end by completing its JSON.
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 10},
            "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
            "required": ["city", "zip"]}},
        "required": ["name", "address"]},
    "enums": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "ok": {"type": "boolean"}},
        "required": ["colour", "size", "ok"]},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4}},
        "required": ["tags", "scores"]},
    "nullable": {"type": "object", "properties": {
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "count": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
        "ref": {"$ref": "#/$defs/point"}},
        "required": ["note", "count", "ref"],
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                              "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                            "required": ["x", "y"]}}},
}
MAX_TOKENS = 400
PROMPTS = ["Return a new dictionary", "The with statement", "A list of", "Raise an error"]


@pytest.fixture(scope="module")
def tiny():
    loaded = load("sirocco-tiny", backend="torch")
    return Engine(loaded.model, loaded.tokenizer, max_rows=8), loaded.tokenizer


def allowed(processor, vocab, draft=()):
    words = torch.empty(len(draft) + 1, mask_words(vocab), dtype=torch.int32)
    assert processor.fill_mask(words, draft)
    return [set(row.nonzero()[:, 0].tolist()) for row in unpack_mask(words, vocab)]


def compact(text: str) -> bool:
    """Whether the JSON text has no whitespace but one optional leading space and the ", " and ": " separators."""
    outside, in_string, escaped = [], False, False
    for c in text[1:] if text.startswith(" ") else text:
        if in_string:
            in_string = not (c == '"' and not escaped)
            escaped = c == "\\" and not escaped
        else:
            in_string = c == '"'
            outside.append("s" if in_string else c)
    rest = "".join(outside)
    return not any(w in rest for w in "\n\t\r") and rest.count(" ") == rest.count(", ") + rest.count(": ")


# -- answers against an independent validator ----------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_answer_validates_and_free_rows_beside_them_are_untouched(tiny, name):
    engine, tok = tiny
    schema = SCHEMAS[name]
    g = json_schema_grammar(schema, strict=True)
    constrained = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=s, constraint=g) for s in range(6)]
    free = SamplingParams(max_tokens=20, temperature=0.9, seed=7)
    results = engine.generate(PROMPTS[:3] * 2 + PROMPTS[3:4] * 2, constrained + [free, free])
    for c in results[:6]:
        assert c.finish_reason == "stop", c.text
        doc = json.loads(c.text)
        jsonschema.validate(doc, schema)
        assert compact(c.text)
        assert tok.eos_id not in c.tokens                                       # ended by the grammar itself
    alone = engine.generate(PROMPTS[3:4], [free])[0]
    assert results[6].tokens == results[7].tokens == alone.tokens


def test_greedy_and_strict_objects_take_no_other_keys(tiny):
    engine, _ = tiny
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    c = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=50, constraint=json_schema_grammar(schema, True)))[0]
    assert c.finish_reason == "stop" and set(json.loads(c.text)) <= {"a"}


def test_a_row_cut_by_max_tokens_says_length(tiny):
    engine, _ = tiny
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 50}}, "required": ["text"]}
    c = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=8, constraint=json_schema_grammar(schema)))[0]
    assert c.finish_reason == "length" and len(c.tokens) == 8
    with pytest.raises(ValueError):
        json.loads(c.text)


def test_tool_calls_grammar_gives_calls_whose_arguments_validate(tiny):
    engine, _tok = tiny
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}
    add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "b": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["a", "b"]}
    functions = [Function("get_weather", weather, strict=True), Function("add", add, strict=True)]
    for choice in ("required", "add"):
        g = tool_calls_grammar(functions, choice, parallel=False)
        for c in engine.generate(PROMPTS, [SamplingParams(max_tokens=200, temperature=1.0, seed=s, constraint=g)
                                           for s in range(4)]):
            assert c.finish_reason == "stop", c.text
            head, _, rest = c.text.partition("[TOOL_CALLS]")
            assert head in ("", " ")
            calls = json.loads(rest)
            assert len(calls) == 1 and list(calls[0]) == ["name", "arguments"]
            assert choice == "required" or calls[0]["name"] == choice
            jsonschema.validate(calls[0]["arguments"], weather if calls[0]["name"] == "get_weather" else add)


def test_auto_and_none_keep_text_apart_from_calls(tiny):
    engine, tok = tiny
    vocab = engine.args.vocab_size
    functions = [Function("f", {"type": "object", "properties": {}}, strict=True)]
    none = tool_calls_grammar(functions, "none").processor(tok, vocab)
    auto = tool_calls_grammar(functions, "auto").processor(tok, vocab)
    start = tok.encode("[TOOL_CALLS]", bos=False)
    # "none": the answer may start with anything but the marker; "auto": the marker too, and then only a call
    assert start[0] in allowed(auto, vocab)[0]
    auto.accept(start)
    after = allowed(auto, vocab)[0]
    call = '[{"name": "f", "arguments": {}}]'
    pieces = tok.token_vocab().tokens
    assert after and all((" " + call).encode().startswith(pieces[t]) or call.encode().startswith(pieces[t])
                         for t in after)
    none.accept(start[:-1])
    assert start[-1] not in allowed(none, vocab)[0]


CALL = ' [{"name": "f", "arguments": {"x": 1}}]'
TEXT_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
ANSWERS = [     # choice, an answer schema (response_format) or None, the answer, whether it is allowed
    ("auto", None, " [TOOL_CALLS]" + CALL, True), ("auto", None, "[TOOL_CALLS]" + CALL, True),
    ("auto", None, " hello [TOOL_CALLS] x", True), ("auto", None, " [TOOL_CALLS] hi", False),
    ("auto", None, " [TOOLS are", True), ("auto", TEXT_SCHEMA, " [TOOL_CALLS]" + CALL, True),
    ("auto", TEXT_SCHEMA, ' {"a": 1}', True), ("auto", TEXT_SCHEMA, " hi", False),
    ("none", None, " hi", True), ("none", None, " [TOOL_CALLS]" + CALL, False),
    ("none", TEXT_SCHEMA, ' {"a": 2}', True), ("none", TEXT_SCHEMA, " [TOOL_CALLS]" + CALL, False),
    ("required", None, " [TOOL_CALLS]" + CALL, True), ("required", None, " hi", False),
    ("required", None, " [TOOL_CALLS]" + CALL[:-1] + ', {"name": "g", "arguments": {}}]', True),
    ("g", None, ' [TOOL_CALLS] [{"name": "g", "arguments": {}}]', True), ("g", None, " [TOOL_CALLS]" + CALL, False),
]
FUNCTIONS = [Function("f", {"type": "object", "properties": {"x": {"type": "integer"}}}, strict=True),
             Function("g", {"type": "object", "properties": {}}, strict=True)]


@pytest.mark.parametrize("choice, text_schema, answer, ok", ANSWERS)
def test_what_each_tool_choice_allows_with_the_text_marker(tiny, choice, text_schema, answer, ok):
    _, tok = tiny
    p = tool_calls_grammar(FUNCTIONS, choice, True, None, text_schema).processor(tok, tok.vocab_size)
    assert (p.matcher.consume_tokens(tok.token_vocab().encode(answer.encode())) and p.matcher.is_accepting()) == ok


@pytest.mark.parametrize("choice, text_schema", [("auto", None), ("auto", TEXT_SCHEMA), ("required", None),
                                                 ("f", None), ("none", None)])
def test_with_mistral_s_control_token_a_call_starts_with_it(choice, text_schema):
    v3 = load_tokenizer(V3)
    g = tool_calls_grammar(FUNCTIONS, choice, False, v3.tool_calls_id, text_schema)
    p = g.processor(v3, v3.vocab_size)
    is_call = p.matcher.consume_tokens([v3.tool_calls_id] + v3.token_vocab().encode(CALL.encode()))
    assert is_call == (choice != "none") and p.matcher.is_accepting() == is_call
    p = g.processor(v3, v3.vocab_size)
    text = (' {"a": 3}' if text_schema else " The [TOOL_CALLS] text").encode()
    assert (p.matcher.consume_tokens(v3.token_vocab().encode(text)) and p.matcher.is_accepting()) == \
        (choice in ("auto", "none"))


# -- masks against brute force over the vocabulary -------------------------------------------------------------
def brute_force(tok, vocab, done: str, documents: list[str]) -> set[int]:
    """Tokens t such that ``done`` + text(t) is a prefix of a valid document (EOS: ``done`` is one)."""
    vb = tok.token_vocab()
    out = set()
    for t in range(vocab):
        if t in vb.special:
            continue
        text = done.encode() + vb.tokens[t]
        if any(d.encode().startswith(text) for d in documents):
            out.add(t)
    if done in documents:
        out.add(tok.eos_id)
    return out


@pytest.mark.parametrize("file", [BUNDLED / "sirocco-tiny" / "tokenizer.model", V1, V3, TEKKEN],
                         ids=["bundled", "v1", "v3", "tekken"])
def test_an_enum_s_masks_are_exactly_the_tokens_that_keep_a_valid_prefix(file):
    tok = load_tokenizer(file)
    vocab = tok.vocab_size
    docs = [f'{space}"{w}"' for space in ("", " ") for w in ("cat", "cod", "dog")]
    p = json_schema_grammar({"enum": ["cat", "cod", "dog"]}).processor(tok, vocab)
    assert allowed(p, vocab)[0] == brute_force(tok, vocab, "", docs)
    ids = tok.token_vocab().encode(b' "c')
    p.accept(ids)
    assert allowed(p, vocab)[0] == brute_force(tok, vocab, ' "c', docs)
    p.accept(tok.token_vocab().encode(b'at"'))
    assert p.finished()


def test_the_same_vocabulary_read_three_ways_gives_the_same_masks(tmp_path):
    """Mistral's v1 file through mistral-common, through sentencepiece, and as a Hugging Face tokenizer.json."""
    from test_tokenizer import copy_as, hf_from_sentencepiece
    kinds = [load_tokenizer(V1), load_tokenizer(copy_as(V1, tmp_path / "sp", "tokenizer.model")),
             load_tokenizer(hf_from_sentencepiece(V1, tmp_path / "hf"))]
    g = json_schema_grammar(SCHEMAS["nested"], strict=True)
    steps = [b"", b' {"name": "Ren\xc3\xa9', b'e", "address": {"city": "Oslo", "zip": 12']
    masks = []
    for tok in kinds:
        p, out = g.processor(tok, 32000), []
        for text in steps:
            p.accept(kinds[1].token_vocab().encode(text) if text else [])
            out.append(allowed(p, 32000)[0])
        masks.append(out)
    assert masks[0] == masks[1] == masks[2]
    assert all(len(m) > 1 for m in masks[0])


# -- drafts -----------------------------------------------------------------------------------------------------
def test_a_draft_s_masks_are_those_of_stepping_through_it_and_the_matcher_rolls_back(tiny):
    _, tok = tiny
    vocab = tok.vocab_size
    g = json_schema_grammar(SCHEMAS["enums"], strict=True)
    text = tok.token_vocab().encode(b'{"colour": "green", "size": "M"')
    draft = text[:5]
    p = g.processor(tok, vocab)
    got = allowed(p, vocab, draft)
    stepped = g.processor(tok, vocab)
    want = []
    for t in [None, *draft]:
        if t is not None:
            stepped.accept([t])
        want.append(allowed(stepped, vocab)[0])
    assert got == want
    assert allowed(p, vocab)[0] == want[0]                       # rolled back: the draft was only tentative
    # a draft the grammar refuses at position 2: rows after it copy row 2 and the state is untouched
    bad = draft[:2] + [tok.encode("zzz", bos=False)[0]] + draft[3:]
    rows = allowed(p, vocab, bad)
    assert rows[:3] == want[:3] and all(r == rows[2] for r in rows[3:])
    p.accept(draft)
    assert allowed(p, vocab)[0] == want[-1]


def test_masks_are_packed_as_the_sampling_seam_reads_them(tiny):
    _, tok = tiny
    p = json_schema_grammar({"const": "x"}).processor(tok, tok.vocab_size)
    words = torch.zeros(1, mask_words(tok.vocab_size), dtype=torch.int32)
    p.fill_mask(words, ())
    quote = tok.token_vocab().encode(b'"')[0]
    assert (int(words[0, quote // MASK_BITS]) >> (quote % MASK_BITS)) & 1


# -- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "if"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "string", "format": "colour"}, "format"),
    ({"type": "object", "x-guidance": {"whitespace_flexible": True}}, "x-guidance"),
])
def test_a_keyword_that_cannot_be_enforced_is_refused_by_name(tiny, schema, keyword):
    _, tok = tiny
    with pytest.raises(GrammarError) as e:
        grammar.check(json_schema_grammar(schema), tok, tok.vocab_size)
    assert e.value.keyword == keyword and repr(keyword) in str(e.value)
    with pytest.raises(GrammarError):
        grammar.validate(json_schema_grammar(schema))


@pytest.mark.parametrize("schema, match", [
    ({"type": "nope"}, "nope"), ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"), ([], "must be a JSON object"),
])
def test_an_invalid_schema_is_refused_with_the_reason(tiny, schema, match):
    _, tok = tiny
    with pytest.raises(GrammarError, match=match):
        grammar.check(json_schema_grammar(schema), tok, tok.vocab_size)


def test_strict_closes_every_object_that_does_not_say():
    closed = grammar.prepare_schema({"type": "object", "properties": {
        "a": {"type": "object", "properties": {}}, "b": {"type": "array", "items": {"properties": {"c": {}}}},
        "d": {"type": "object", "additionalProperties": {"type": "integer"}}},
        "$defs": {"e": {"type": "object"}}}, strict=True)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["properties"]["d"]["additionalProperties"] == {"type": "integer"}
    assert closed["$defs"]["e"]["additionalProperties"] is False


def test_a_compiled_grammar_is_never_served_for_another_vocabulary():
    """Tokenizers come and go (each test, each model): a grammar compiled for one must not be found for the next,
    even where Python reuses the first one's memory for the second's."""
    g = json_schema_grammar({"const": "x"})
    for file in [V3, TEKKEN, V3, V1]:
        tok = load_tokenizer(file)
        p = g.processor(tok, tok.vocab_size)
        assert allowed(p, tok.vocab_size)[0] == brute_force(tok, tok.vocab_size, "", ['"x"', ' "x"'])
        del tok, p
    # the cache holds each entry's vocabulary alive, so its id (the key) cannot be taken by a new one
    assert all(id(entry[0]) == key[0] for key, entry in grammar._matchers.items())
