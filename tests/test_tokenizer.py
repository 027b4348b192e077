"""Tokenizers against their references: mistral-common and sentencepiece for Mistral's real files (shipped inside
mistral-common), the tokenizers library for Hugging Face files; slices and streaming against whole decodes."""

import json
import random
import shutil
import string
from pathlib import Path

import mistral_common
import pytest
import sentencepiece
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from sirocco.errors import TokenizerError
from sirocco.generate.text import TextTracker
from sirocco.tokenizer import find_tokenizer_files, load_tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
V1 = DATA / "tokenizer.model.v1"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
V2 = DATA / "mistral_instruct_tokenizer_240216.model.v2"
TEKKEN = DATA / "tekken_240911.json"

TEXTS = [
    "Hello world",
    "  two leading spaces, two  inner, and trailing  ",
    "lines\n\nwith\ttabs\n  and indents\n",
    "café naïve Straße Ελληνικά русский 日本語 한국어",
    "emoji 🙂🦜 and rare 𝔘 龘 (byte pieces)",
    "<s> [INST] not control tokens [/INST] </s>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "  What is 2+2? 🙂\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! "},
     {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "d"}],
    [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "then you"}],
    [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn", "prefix": True}],
]


def mistral_chat(file, messages):
    """The reference: mistral-common's own encoding of a conversation."""
    request = ChatCompletionRequest(messages=messages)
    return MistralTokenizer.from_file(str(file)).encode_chat_completion(request).tokens


def copy_as(file, folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(file, folder / name)
    return folder


@pytest.fixture(scope="module")
def v1():
    return load_tokenizer(V1)


@pytest.fixture(scope="module")
def v3():
    return load_tokenizer(V3)


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(TEKKEN)


@pytest.fixture(scope="module")
def plain_v1(tmp_path_factory):
    """Mistral's v1 model under the plain name a Hugging Face folder uses: read by sentencepiece itself."""
    return load_tokenizer(copy_as(V1, tmp_path_factory.mktemp("hf_v1"), "tokenizer.model"))


@pytest.fixture(scope="module")
def plain_v3(tmp_path_factory):
    return load_tokenizer(copy_as(V3, tmp_path_factory.mktemp("hf_v3"), "tokenizer.model"))


def hf_from_sentencepiece(model_file, folder):
    """A Hugging Face folder's tokenizer.json as transformers converts it from Mistral's sentencepiece model
    (legacy dummy prefix, <unk>/<s>/</s> and the [..] control pieces as special tokens), with its config."""
    pytest.importorskip("google.protobuf")
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        pytest.skip("this transformers has no build_tokenizer_from_spm_proto")

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                     legacy=True)
    hf.add_special_tokens([p.piece for p in proto.pieces if p.type in (2, 3)])   # unknown, control
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def hf_v1(tmp_path_factory):
    return load_tokenizer(hf_from_sentencepiece(V1, tmp_path_factory.mktemp("hf_json_v1")))


@pytest.fixture(scope="module")
def hf_v3(tmp_path_factory):
    return load_tokenizer(hf_from_sentencepiece(V3, tmp_path_factory.mktemp("hf_json_v3")))


# -- Mistral's real files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, vocab", [(V1, 32000), (V2, 32768), (V3, 32768), (TEKKEN, 131072)],
                         ids=["v1", "v2", "v3", "tekken"])
def test_real_tokenizers_match_mistral_common(file, vocab):
    tok = load_tokenizer(file)
    ref = MistralTokenizer.from_file(str(file)).instruct_tokenizer.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, vocab)
    assert tok.source == str(file)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, bos=True, eos=False)
        assert tok.encode(text, bos=False, eos=True) == ref.encode(text, bos=False, eos=True)
        assert ids[0] == 1
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(tok.encode(text, eos=True)) == text


@pytest.mark.parametrize("file", [V1, V3], ids=["v1", "v3"])
def test_sentencepiece_files_match_sentencepiece(file):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    tok = load_tokenizer(file)
    for text in TEXTS:
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.decode([1] + sp.encode(text)) == sp.decode(sp.encode(text))


def test_v1_known_ids(v1):
    assert v1.encode("Hello") == [1, 22557]
    assert v1.encode("Hello world", eos=True) == [1, 22557, 1526, 2]


# -- slices and streaming ------------------------------------------------------------------------------------
KINDS = ["v1", "v3", "tekken", "plain_v1", "hf_v1"]
LONG = "The big cat sat.\n\n  Indented line, café 🦜 and 龘 𝔘 ok   spaced  end."


@pytest.mark.parametrize("kind", KINDS)
def test_decode_of_a_slice_is_the_text_it_adds(kind, request):
    tok = request.getfixturevalue(kind)
    ids = tok.encode(LONG)
    assert tok.decode(ids) == LONG
    cuts = 0
    for k in range(2, len(ids)):
        head, tail = tok.decode(ids[:k]), tok.decode(ids[k:])
        if head.endswith("\ufffd") or tail.startswith("\ufffd"):
            continue                                        # the cut splits a character's bytes
        assert head + tail == LONG, (k, head, tail)
        cuts += 1
    assert cuts > len(ids) // 2


def test_slices_keep_the_leading_space_that_sentencepiece_drops(v1):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    ids = v1.encode("The big cat")
    assert sp.decode(ids[2:]) == "big cat"                  # the library's decode, for contrast
    assert v1.decode(ids[2:]) == " big cat"
    assert v1.decode(ids[1:]) == " The big cat"              # no BOS: these ids follow some other text
    assert v1.decode(ids) == "The big cat"
    assert v1.decode([]) == "" and v1.decode([1]) == "" and v1.decode([2]) == ""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_len", [1, 2, 3, 7, 20])
def test_text_tracker_streams_exactly_the_decoded_text(kind, prompt_len, request):
    """Streaming pieces as generate/text.py does with a real tokenizer adds up to the text of the whole."""
    tok = request.getfixturevalue(kind)
    ids = tok.encode(LONG)
    while tok.decode(ids[:prompt_len]).endswith("\ufffd"):
        prompt_len += 1                                      # a text prompt never ends inside a character
    prompt, generated = ids[:prompt_len], ids[prompt_len:]
    expected = tok.decode(ids)[len(tok.decode(prompt)):]
    tracker = TextTracker(tok, prompt)
    streamed = "".join(tracker.push(t)[0] for t in generated) + tracker.finish()
    assert streamed == tracker.text == expected
    if prompt_len > 1:        # after a BOS-only prompt the text starts with the first generated token
        assert tok.decode(generated) == expected             # a completion's tokens decode to its text


# -- folders, kinds, errors ----------------------------------------------------------------------------------
def test_folder_search_order(tmp_path):
    names = ["tokenizer.json", "tokenizer.model", "mistral_instruct_tokenizer_240323.model.v3",
             "tokenizer.model.v7m1", "tokenizer.model.v1", "tokenizer.model.v7", "tekken_240718.json", "tekken.json",
             "params.json", "notes.txt"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert [f.name for f in find_tokenizer_files(tmp_path)] == [
        "tekken.json", "tekken_240718.json", "tokenizer.model.v7", "tokenizer.model.v7m1", "tokenizer.model.v1",
        "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model", "tokenizer.json"]


def test_mistral_folder_finds_the_versioned_file(tmp_path, caplog):
    copy_as(V3, tmp_path, V3.name)
    copy_as(V1, tmp_path, "tokenizer.model")                # a plain model loses to the versioned one
    (tmp_path / "params.json").write_text("{}")
    with caplog.at_level("INFO", logger="sirocco.tokenizer"):
        tok = load_tokenizer(tmp_path)
    assert tok.source == str(tmp_path / V3.name) and tok.vocab_size == 32768
    assert "tokenizer: loaded " + str(tmp_path / V3.name) in caplog.text


def test_tekken_folder(tmp_path):
    tok = load_tokenizer(copy_as(TEKKEN, tmp_path, "tekken.json"))
    assert tok.kind.startswith("mistral-common") and tok.vocab_size == 131072
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_plain_sentencepiece_folder_is_read_by_sentencepiece(plain_v1):
    assert plain_v1.kind == "sentencepiece" and plain_v1.source.endswith("tokenizer.model")
    assert (plain_v1.bos_id, plain_v1.eos_id, plain_v1.vocab_size) == (1, 2, 32000)
    ref = load_tokenizer(V1)
    for text in TEXTS:
        assert plain_v1.encode(text) == ref.encode(text)
        assert plain_v1.decode(plain_v1.encode(text)) == text


def test_a_freshly_trained_sentencepiece_bpe_loads(tmp_path):
    """A small BPE trained the way one trains a Mistral-style tokenizer (ids 0/1/2 = unk/bos/eos, byte
    fallback, no normalisation) and saved as tokenizer.model: found in its folder and round-tripping through it."""
    lines = ["The sliding window attends to the last W keys.", "A rolling buffer cache keeps W slots per layer.",
             "Mixtral routes each token to two of eight experts.", "café, naïve, 日本語"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), model_type="bpe", vocab_size=300,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)   # lossless, as Mistral's
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 300)
    for text in TEXTS + lines[:4]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == 1


def test_hf_tokenizer_json_folder(tmp_path):
    """A tiny BPE trained with the tokenizers library, saved as a Hugging Face folder would have it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["The sliding window.", "A rolling buffer cache.", "Mixtral has experts."] * 10, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    hf.encode_special_tokens = True                          # as sirocco reads it: "<s>" in a text is text
    assert tok.kind == "tokenizers" and tok.source == str(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>")) == (1, 2)
    assert tok.vocab_size == hf.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == hf.encode(text).ids
        assert tok.decode(ids) == text
    assert tok.encode("<s>", bos=False) != [1]

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "<s>"}))
    swapped = load_tokenizer(tmp_path)
    assert (swapped.bos_id, swapped.eos_id) == (2, 1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>"}))
    with pytest.raises(TokenizerError, match=r"bos_token '<\|begin\|>' \(tokenizer_config.json\) is not in"):
        load_tokenizer(tmp_path)


def test_hf_conversion_of_mistral_v1_matches_sentencepiece(hf_v1):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    assert hf_v1.kind == "tokenizers" and (hf_v1.bos_id, hf_v1.eos_id, hf_v1.vocab_size) == (1, 2, 32000)
    for text in TEXTS:
        assert hf_v1.encode(text) == [1] + sp.encode(text)
        assert hf_v1.decode(hf_v1.encode(text)) == text


def test_no_tokenizer_names_the_folder_and_the_names(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for name in ("tekken.json", "tokenizer.model.vN", "tokenizer.model", "tokenizer.json"):
        assert name in msg
    with pytest.raises(TokenizerError, match="no such tokenizer file or model folder"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("name, content", [
    ("tokenizer.model", b"not a protobuf \x00\x01\x02"),
    ("tokenizer.model.v3", b"garbage"),
    ("tekken.json", b'{"config": {"pattern": '),
    ("tekken.json", b'{"vocab": []}'),
    ("tokenizer.json", b"{]"),
    ("tokenizer.json", b""),
], ids=["sentencepiece", "versioned", "tekken-truncated", "tekken-fields", "hf-json", "hf-empty"])
def test_corrupt_files_give_a_clear_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=str(tmp_path / name).replace("\\", "\\\\")):
        load_tokenizer(tmp_path)


def test_truncated_real_model_gives_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(V1.read_bytes()[:1000])
    with pytest.raises(TokenizerError, match="not a readable sentencepiece model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["v1", "tekken", "hf_v1"])
def test_decode_names_ids_outside_the_vocabulary(kind, request):
    tok = request.getfixturevalue(kind)
    with pytest.raises(TokenizerError, match=rf"\[{tok.vocab_size}, -1\].*{tok.vocab_size} tokens"):
        tok.decode([5, tok.vocab_size, -1])


# -- chat ----------------------------------------------------------------------------------------------------
# kind -> the file whose mistral-common encoding it must reproduce. plain_* and hf_* build the format in
# chat.py: v1 as text pieces, v3 with [INST]/[/INST] as control tokens.
CHAT_REFERENCE = {"v1": V1, "v3": V3, "plain_v1": V1, "plain_v3": V3, "hf_v1": V1, "hf_v3": V3}


@pytest.mark.parametrize("kind", CHAT_REFERENCE)
@pytest.mark.parametrize("messages", CHATS, ids=range(len(CHATS)))
def test_chat_equals_mistral_common(kind, messages, request):
    tok = request.getfixturevalue(kind)
    assert tok.encode_chat(messages) == mistral_chat(CHAT_REFERENCE[kind], messages)


def test_chat_ids_look_like_the_format(v1, plain_v3):
    assert plain_v3.inst_ids == (3, 4) and v1.inst_ids is None
    ids = plain_v3.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert v1.decode(v1.encode_chat(CHATS[3])) == "[INST] Hi [/INST] Hello!  [INST] Name a colour. [/INST]"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "message 0 has role 'robot'"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\) needs a string 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be the user"),
    ("hello", "non-empty list"),
])
@pytest.mark.parametrize("kind", ["v3", "plain_v1", "hf_v1"])
def test_bad_chat_messages_are_named(kind, messages, match, request):
    tok = request.getfixturevalue(kind)
    with pytest.raises(TokenizerError, match=match if kind != "v3" or "last" not in match else "last role"):
        tok.encode_chat(messages)


# -- tools ------------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                               "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]
TOOL_CHATS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "a1b2c3d4e", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
         {"id": "Z9y8X7w6v", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"temp": 21}'},
     {"role": "tool", "tool_call_id": "Z9y8X7w6v", "content": "noon"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Where?"},
     {"role": "user", "content": "Oslo"}, {"role": "assistant", "content": "", "tool_calls": [
         {"id": "q1w2e3r4t", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
     {"role": "tool", "tool_call_id": "q1w2e3r4t", "content": "-3"}, {"role": "assistant", "content": "Cold."},
     {"role": "user", "content": "Thanks"}],
]


def mistral_tool_chat(file, messages, tools):
    """The reference, built by hand from mistral-common's own request objects."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    objects = []
    for m in messages:
        if m["role"] == "system":
            objects.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            objects.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            objects.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        elif m.get("tool_calls"):
            objects.append(AssistantMessage(tool_calls=[
                ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m["tool_calls"]]))
        else:
            objects.append(AssistantMessage(content=m["content"]))
    functions = [Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description", ""),
                                        parameters=t["function"].get("parameters", {"type": "object",
                                                                                    "properties": {}})))
                 for t in tools]
    request = ChatCompletionRequest(messages=objects, tools=functions)
    return MistralTokenizer.from_file(str(file)).encode_chat_completion(request).tokens


@pytest.mark.parametrize("file", [V3, V2, TEKKEN], ids=["v3", "v2", "tekken"])
@pytest.mark.parametrize("messages", TOOL_CHATS, ids=range(len(TOOL_CHATS)))
def test_a_tool_prompt_is_mistral_common_s_token_for_token(file, messages):
    tok = load_tokenizer(file)
    assert tok.tool_calls_id == tok.raw.get_special_token("[TOOL_CALLS]")
    if file == V2 and sum(m["role"] == "tool" for m in messages) > 1:
        with pytest.raises(TokenizerError, match="mistral-common rejects"):       # v2: one result per turn
            tok.encode_chat(messages, TOOLS)
        return
    ids = tok.encode_chat(messages, TOOLS)
    assert ids == mistral_tool_chat(file, messages, TOOLS)
    assert tok.tool_calls_id in ids or len(messages) == 1 or file == V2     # v2 drops calls before the last user turn


def test_the_plain_text_template_writes_the_tools_calls_and_results_as_text(plain_v1, v1):
    messages = TOOL_CHATS[1]
    ids = plain_v1.encode_chat(messages, TOOLS)
    assert ids == v1.encode_chat(messages, TOOLS)        # mistral-common's v1 has no tool tokens: the same template
    text = plain_v1.decode(ids)
    tools = ('[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", '
             '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", '
             '"F"]}}, "required": ["city"]}}}, {"type": "function", "function": {"name": "now", "description": "", '
             '"parameters": {"type": "object", "properties": {}}}}]')
    assert text == (f'[AVAILABLE_TOOLS] {tools} [/AVAILABLE_TOOLS] [INST] Be brief.\n\nWeather in Paris? [/INST] '
                    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, "id": '
                    '"a1b2c3d4e"}, {"name": "now", "arguments": {}, "id": "Z9y8X7w6v"}] [TOOL_RESULTS] {"content": '
                    '{"temp": 21}, "call_id": "a1b2c3d4e"} [/TOOL_RESULTS] [TOOL_RESULTS] {"content": "noon", '
                    '"call_id": "Z9y8X7w6v"} [/TOOL_RESULTS]')
    assert ids.count(plain_v1.eos_id) == 1                 # after the calls, as after any assistant turn
    # each part is encoded on its own, as the turns are
    assert ids[-len(plain_v1.encode('[TOOL_RESULTS] {"content": "noon", "call_id": "Z9y8X7w6v"} [/TOOL_RESULTS]',
                                    bos=False)):] == plain_v1.encode(
        '[TOOL_RESULTS] {"content": "noon", "call_id": "Z9y8X7w6v"} [/TOOL_RESULTS]', bos=False)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "needs a 'tool_call_id'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "a1b2c3d4e", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "both"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{"id": 3}]}],
     r"tool_calls\[0\] must be"),
])
def test_bad_tool_messages_are_named(plain_v1, messages, match):
    with pytest.raises(TokenizerError, match=match):
        plain_v1.encode_chat(messages, TOOLS)


def test_which_tokenizers_write_mistral_s_tool_format(v1, v3, tekken, plain_v3):
    v7 = load_tokenizer(DATA / "mistral_instruct_tokenizer_241114.model.v7")
    assert [t.tool_calls_id for t in (v3, tekken, v7)] == [5, 9, 5]
    assert all(t.tools_unsupported is None for t in (v3, tekken, v7))
    assert v1.tool_calls_id is None and plain_v3.tool_calls_id is None      # the plain-text template


# -- a lower bound on tokens from characters ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_v1():
    """Mistral's v1 vocabulary as a GGUF file carries it, read back as sentencepiece."""
    from sirocco.tokenizer.gguf_vocab import sentencepiece_proto, vocab_from_sentencepiece
    from sirocco.tokenizer.sentencepiece_model import SentencePieceTokenizer
    return SentencePieceTokenizer("v1 (GGUF)", model_proto=sentencepiece_proto(vocab_from_sentencepiece(str(V1))))


@pytest.fixture(scope="module")
def hf_byte_level(tmp_path_factory):
    """A byte-level BPE as the tokenizers library trains one (GPT-2's shape): no byte fallback, no fused unknowns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([LONG, "=" * 40, " " * 40, "The sliding window.", "A rolling buffer cache."] * 10, trainer)
    folder = tmp_path_factory.mktemp("hf_byte_level")
    hf.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


BOUND_KINDS = {"v1": 16, "v3": 18, "tekken": 76, "plain_v1": 16, "gguf_v1": 16, "hf_v1": 16, "hf_byte_level": None}


def adversarial_texts(tok) -> list[str]:
    """Texts that push characters per token up: runs of one character (whitespace and punctuation are the
    longest pieces), every piece of the vocabulary, its longest pieces repeated; and down: byte-fallback emoji,
    random code points."""
    rng = random.Random(0)
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    longest = sorted(pieces, key=len, reverse=True)[:40]
    shuffled = rng.sample(pieces, len(pieces))
    code_points = [rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800), rng.randrange(0xE000, 0x110000)])
                   for _ in range(3000)]
    return [
        *(c * 3000 for c in " a\n\t=0▁-_.*/🙂龘"),
        " \n" * 1000, "  \t\n" * 600, "ab " * 1000, "\r\n" * 1000,
        *(p * 60 for p in longest), "".join(longest) * 5, "".join(shuffled),
        "".join(rng.choice(string.printable) for _ in range(5000)),
        "".join(chr(c) for c in code_points),
        "🙂🦜𝔘龘 " * 300, *TEXTS,
    ]


@pytest.mark.parametrize("kind", BOUND_KINDS)
def test_max_chars_per_token_bounds_every_text(kind, request):
    """tokens * m >= characters for every text; and for Mistral's files m is not loose: some text comes within a
    factor 2 of it (a run of the longest piece's character)."""
    tok = request.getfixturevalue(kind)
    m = tok.max_chars_per_token()
    assert m is not None and m == (BOUND_KINDS[kind] or m)
    best = 0.0
    for text in adversarial_texts(tok):
        n = len(tok.encode(text, bos=False))
        assert n * m >= len(text), (kind, m, n, len(text), text[:40])
        best = max(best, len(text) / max(n, 1))
    assert BOUND_KINDS[kind] is None or best > m / 2, (kind, m, best)


CHAT_BOUND = [
    [{"role": "user", "content": " " * 5000}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "=" * 3000 + " " * 3000},
     {"role": "user", "content": "-" * 3000}],
    [{"role": "system", "content": "\n" * 2000 + "*" * 2000}, {"role": "user", "content": "  " + "/" * 4000 + "  "}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": " " * 3000},
     {"role": "assistant", "content": " " * 1000 + "b", "prefix": True}],
]


@pytest.mark.parametrize("kind", ["v1", "v3", "tekken", "plain_v1", "plain_v3", "hf_v1"])
def test_chat_prompts_have_at_least_the_tokens_of_their_kept_characters(kind, request):
    """What the server checks before encoding a conversation: 1 + ceil(kept characters / m) tokens at least, with
    contents of long runs of the longest pieces (and whitespace at their ends, which some formats cut)."""
    from sirocco.tokenizer.chat import kept_chars
    tok = request.getfixturevalue(kind)
    m = tok.max_chars_per_token()
    for messages in CHAT_BOUND:
        n = len(tok.encode_chat(messages))
        assert n >= 1 + -(-kept_chars(messages) // m), (kind, messages[0]["content"][:10], n)


def test_no_bound_where_characters_are_dropped_or_merged(tmp_path, hf_byte_level):
    """None where the file lets one token stand for any number of characters, each shown to happen."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    lines = ["The sliding window attends to the last W keys.", "A rolling buffer cache keeps W slots."] * 20

    def train(name, **options):
        folder = tmp_path / name
        folder.mkdir()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe",
            vocab_size=300 if options["byte_fallback"] else 40, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, minloglevel=2, **options)
        return load_tokenizer(folder)

    nfkc = train("nfkc", byte_fallback=True)                 # the trainer's default: NFKC, extra spaces removed
    assert nfkc.max_chars_per_token() is None and len(nfkc.encode(" " * 1000, bos=False)) <= 2
    no_bytes = train("no_bytes", byte_fallback=False, normalization_rule_name="identity",
                     remove_extra_whitespaces=False)
    assert no_bytes.max_chars_per_token() is None and len(no_bytes.encode("日本語" * 100, bos=False)) <= 2
    with_bytes = train("with_bytes", byte_fallback=True, normalization_rule_name="identity",
                       remove_extra_whitespaces=False)
    assert with_bytes.max_chars_per_token() is not None

    def hf(name, model, **steps):
        t = Tokenizer(model)
        for attr, step in steps.items():
            setattr(t, attr, step)
        (tmp_path / name).mkdir()
        t.save(str(tmp_path / name / "tokenizer.json"))
        return load_tokenizer(tmp_path / name)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    word_piece = hf("word_piece", models.WordPiece(vocab, unk_token="<unk>"))
    assert word_piece.max_chars_per_token() is None and len(word_piece.encode("x" * 90, bos=False)) == 1
    fused = hf("fused", models.BPE(vocab, [], unk_token="<unk>", fuse_unk=True))
    assert fused.max_chars_per_token() is None and len(fused.encode("x" * 90, bos=False)) == 1
    assert hf("unfused", models.BPE(vocab, [], unk_token="<unk>")).max_chars_per_token() == 5
    split = hf("split", models.BPE(vocab, [], unk_token="<unk>"), pre_tokenizer=pre_tokenizers.WhitespaceSplit())
    assert split.max_chars_per_token() is None and split.encode(" " * 90, bos=False) == []
    stripped = hf("stripped", models.BPE(vocab, [], unk_token="<unk>"), normalizer=normalizers.Strip())
    assert stripped.max_chars_per_token() is None and stripped.encode(" " * 90, bos=False) == []
    truncating = type(hf_byte_level)(Path(hf_byte_level.source))     # its own copy of the fixture's file
    truncating.tok.enable_truncation(8)
    assert truncating.max_chars_per_token() is None and len(truncating.encode("a b " * 90, bos=False)) == 8
