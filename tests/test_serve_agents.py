"""What agents send a server: structured outputs (``response_format``) and tools, end to end through the openai
SDK on 127.0.0.1, over the bundled model (its sentencepiece tokenizer: the plain-text tool template) and over a
tiny random model with Mistral's v3 tokenizer (the [TOOL_CALLS] control token); answers are checked with
jsonschema. Also: every field is audited, and the context is never cut silently."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import jsonschema
import openai
import pytest
import torch

from serve_fixtures import serve
from sirocco.checkpoint import save_consolidated
from sirocco.config import preset
from sirocco.model import build_model
from sirocco.pretrained import BUNDLED
from test_grammar import SCHEMAS, V3

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -50, "maximum": 50},
                                        "b": {"type": "integer", "minimum": -50, "maximum": 50}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def bundled():
    with serve(BUNDLED / "sirocco-tiny", "--max-rows", "4") as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def v3_model(tmp_path_factory):
    """A tiny random model over Mistral's v3 vocabulary, with its tokenizer file."""
    folder = tmp_path_factory.mktemp("v3") / "tiny-v3"
    args = preset("tiny", vocab_size=32768, max_seq_len=512)
    save_consolidated(build_model(args, dtype=torch.float32, seed=0), args, folder)
    shutil.copy(V3, folder / "tokenizer.model.v3")
    return folder


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def response_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


# -- structured outputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_validates_streamed_or_not(bundled, name):
    c, schema = client(bundled[0]), SCHEMAS[name]
    r = c.chat.completions.create(model="sirocco-tiny", messages=ASK, max_tokens=400, temperature=1.0, seed=11, n=2,
                                  response_format=response_format(schema))
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), schema)
    stream = c.chat.completions.create(model="sirocco-tiny", messages=ASK, max_tokens=400, temperature=1.0, seed=11,
                                       n=2, response_format=response_format(schema), stream=True,
                                       stream_options={"include_usage": True})
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert texts == [ch.message.content for ch in r.choices] and finish == ["stop"] * 2
    # the same prompt again: it continued from the prefix store, all but its last token
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens == \
        r.usage.prompt_tokens - 1
    done = c.completions.create(model="sirocco-tiny", prompt="A dictionary:", max_tokens=400, temperature=0.8,
                                seed=3, extra_body={"response_format": response_format(schema)})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), schema)


def test_json_object_is_an_object(bundled):
    r = client(bundled[0]).chat.completions.create(model="sirocco-tiny", messages=ASK, max_tokens=60,
                                                   temperature=0, response_format={"type": "json_object"})
    ch = r.choices[0]
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:                                           # an unbounded object may run out of tokens: said, not hidden
        assert ch.finish_reason == "length" and ch.message.content.lstrip().startswith("{")


# -- tools ------------------------------------------------------------------------------------------------------
def calls_of(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id) and call.type == "function"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
        out.append((call.function.name, args))
    return out


def stream_calls(stream) -> tuple[list[tuple[str, dict]], str]:
    """Fold OpenAI's tool_calls deltas, checking their order: id, type and name first, then argument pieces."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            assert ch.delta.content is None
            for d in ch.delta.tool_calls or ():
                if d.index not in calls:
                    assert re.fullmatch(r"[A-Za-z0-9]{9}", d.id) and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    out = []
    for k in sorted(calls):
        args = json.loads(calls[k]["arguments"])
        jsonschema.validate(args, PARAMS[calls[k]["name"]])
        out.append((calls[k]["name"], args))
    return out, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_give_calls_whose_arguments_validate(bundled, choice):
    c = client(bundled[0])
    for seed in (1, 2):
        kw = dict(model="sirocco-tiny", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=200, temperature=1.0, seed=seed)
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        calls = calls_of(ch.message)
        assert len(calls) == 1 and (choice == "required" or calls[0][0] == "add")
        streamed, finish = stream_calls(c.chat.completions.create(**kw, stream=True))
        assert streamed == calls and finish == "tool_calls"


def test_parallel_calls_come_as_several_indexed_calls(bundled):
    c = client(bundled[0])
    r = c.chat.completions.create(model="sirocco-tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                  max_tokens=300, temperature=1.0, seed=4)
    ch = r.choices[0]
    complete = [call for call in ch.message.tool_calls]
    if ch.finish_reason == "length":           # the list may grow until max_tokens: its last call is cut short
        complete = complete[:-1]
    else:
        assert ch.finish_reason == "tool_calls"
    for call in complete:
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert len({call.id for call in ch.message.tool_calls}) == len(ch.message.tool_calls)


def test_auto_answers_text_or_calls_and_none_only_text(bundled):
    c = client(bundled[0])
    for choice in ("auto", "none"):
        for seed in range(3):
            r = c.chat.completions.create(model="sirocco-tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                          max_tokens=40, temperature=1.0, seed=seed)
            if seed:                        # the same prompt again: continued from the prefix store
                assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
            m = r.choices[0].message
            if m.tool_calls:
                assert choice == "auto" and m.content is None
            else:
                assert not m.content.lstrip(" ").startswith("[TOOL_CALLS]")


def test_a_tool_result_round_trip(bundled):
    url, server = bundled
    c = client(url)
    first = c.chat.completions.create(model="sirocco-tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                      parallel_tool_calls=False, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'}]
    second = c.chat.completions.create(model="sirocco-tiny", messages=history, tools=TOOLS, max_tokens=12,
                                       temperature=0, tool_choice="none")
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")
    prompt = server.tokenizer.encode_chat(
        ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                              "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'}], TOOLS)
    assert second.usage.prompt_tokens == len(prompt)
    counted = httpx.post(url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    assert counted["tokens"] == prompt
    assert f'[TOOL_RESULTS] {{"content": {{"temp": 21, "sky": "clear"}}, "call_id": "{call.id}"}}' in \
        server.tokenizer.decode(prompt)


def test_with_mistral_s_v3_tokenizer_calls_start_with_its_control_token(v3_model):
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, Tool
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    with serve(v3_model, "--max-rows", "2") as (url, server):
        c = client(url)
        kw = dict(model="tiny-v3", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=120, temperature=1.0, seed=5, logprobs=True)
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        calls = calls_of(ch.message)
        assert ch.logprobs.content[0].token == ""                        # the [TOOL_CALLS] token: no text
        streamed, finish = stream_calls(c.chat.completions.create(**{k: v for k, v in kw.items() if k != "logprobs"},
                                                                  stream=True))
        assert streamed == calls and finish == "tool_calls"
        request = ChatCompletionRequest(messages=[UserMessage(content=ASK[0]["content"])], tools=[
            Tool(function=Function(name=t["function"]["name"], description=t["function"]["description"],
                                   parameters=t["function"]["parameters"])) for t in TOOLS])
        want = MistralTokenizer.from_file(str(V3)).encode_chat_completion(request).tokens
        assert r.usage.prompt_tokens == len(want)
        assert server.tokenizer.encode_chat(ASK, [{"type": "function", "function": {
            k: v for k, v in t["function"].items() if k != "strict"}} for t in TOOLS]) == want


# -- refusals ---------------------------------------------------------------------------------------------------
CHAT = {"messages": ASK, "max_tokens": 4}
BAD = [
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": response_format({"type": "nope"})}, "response_format", "invalid_schema"),
    ({"response_format": response_format({"type": "object", "properties": {"a": {"not": {}}}})}, "response_format",
     "unsupported_schema_keyword"),
    ({"response_format": response_format({"type": "string", "format": "colour"})}, "response_format",
     "unsupported_schema_keyword"),
    ({"response_format": response_format({"type": "array", "uniqueItems": True})}, "response_format",
     "unsupported_schema_keyword"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
     "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"if": {}}}}}}]}, "tools[0].function.parameters", "unsupported_schema_keyword"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", None),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "nowhere12", "content": "x"}]}, "messages[1].tool_call_id",
     None),
    ({"messages": [{"role": "user", "content": "x", "name": "ann"}]}, "messages[0].name", "unsupported_parameter"),
    ({"min_p": 0.1}, "min_p", "unknown_parameter"),
    ({"echo": True}, "echo", "unknown_parameter"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options", "unknown_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
]


def test_what_cannot_be_honoured_is_a_400_naming_it(bundled):
    url = bundled[0]
    for extra, param, code in BAD:
        r = httpx.post(url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and (code is None or err["code"] == code), (extra, err)
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={**CHAT, "response_format": response_format(
        {"type": "object", "properties": {"a": {"not": {}}}})})
    assert "'not'" in r.json()["error"]["message"]
    for extra, param in [({"tools": TOOLS}, "tools"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")]:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_annotations_are_accepted(bundled):
    r = httpx.post(bundled[0] + "/v1/chat/completions", timeout=60, json={
        **CHAT, "user": "u1", "metadata": {"k": "v"}, "service_tier": "auto", "store": False, "modalities": ["text"],
        "safety_identifier": "s", "prompt_cache_key": "p", "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


# -- context honesty --------------------------------------------------------------------------------------------
def test_the_context_is_reported_and_never_cut_silently():
    with serve(BUNDLED / "sirocco-tiny", "--max-rows", "2", "--max-seq-len", "64") as (url, server):
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["max_model_len"] == 64
        # no max_tokens: the answer runs to the context and says so
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": ASK, "ignore_eos": True, "temperature": 0}).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["total_tokens"] == 64
        prompt = r["usage"]["prompt_tokens"]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": ASK, "max_tokens": 65 - prompt})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert all(str(n) in err["message"] for n in (64, 65, prompt, 65 - prompt))
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "word " * 80}]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "64" in err["message"]
