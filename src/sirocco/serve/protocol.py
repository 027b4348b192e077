"""The OpenAI wire format: request checks and response shapes of /v1/completions and /v1/chat/completions.

Requests are checked by hand rather than by pydantic models so that every refusal is a 400 with OpenAI's error
body naming the field (``param``), where FastAPI's own validation would answer 422 in its own shape. Nothing a
request asks for is silently dropped: a field this server does not know is refused (as OpenAI's API refuses
an unrecognized argument), and so is a known one it cannot honour (penalties, ``echo``, ``suffix``,
``best_of`` other than ``n``, ``store``, ``prediction``, ``audio``, ``reasoning_effort``, a non-text modality,
the deprecated ``functions``). Accepted although they change nothing here: ``user``, ``safety_identifier``,
``metadata`` (labels of a stored completion; nothing is stored), ``prompt_cache_key`` (a routing hint: the
prefix store matches prompts by their tokens), ``service_tier`` "auto" or "default" (there is one tier),
``stream_options.include_obfuscation`` (chunks carry no padding). sirocco's own: ``top_k``, ``ignore_eos``.
Every answer's ``usage`` (tool calls and structured outputs alike) has ``prompt_tokens_details.cached_tokens``:
the prompt tokens continued from the prefix store rather than pre-filled.

Structured outputs (``response_format``, both endpoints): ``text``; ``json_object`` (any JSON object);
``json_schema`` with ``{"name", "schema", "strict"}``, enforced by token masks (generate/grammar.py): a schema
keyword the grammar engine cannot enforce is a 400 naming it. Tools (chat): ``tools`` (functions), ``tool_choice``
("none", "auto", "required", or ``{"type": "function", "function": {"name"}}``), ``parallel_tool_calls``;
assistant messages with ``tool_calls`` and ``role: tool`` messages with ``tool_call_id``; the answer's calls
come back as ``message.tool_calls`` (serve/tools.py reads them) with ``finish_reason: "tool_calls"``.

The two endpoints' logprobs differ, and mixing them is a recurring bug elsewhere:

    completions (``logprobs: k``):  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}, ...],
                                     "text_offset": [...]}
    chat (``logprobs: true``, ``top_logprobs: k``): {"content": [{"token", "logprob", "bytes",
                                     "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..generate.engine import Event
from ..generate.grammar import Function, Grammar, GrammarError, json_object_grammar, json_schema_grammar
from ..generate.sampling import SamplingParams
from ..tokenizer.chat import NO_PARAMETERS

MAX_TOP_LOGPROBS = 20
MAX_N = 16


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_error(prompt_len: int, limit: int, param: str, at_least: bool = False) -> APIError:
    """The prompt does not fit: a stable message with both numbers (tools parse them to trim and retry).
    ``at_least``: ``prompt_len`` is a lower bound, from the prompt's characters, for a prompt refused untokenized."""
    return bad(f"This model's maximum context length is {limit} tokens. However, your prompt has "
               f"{'at least ' if at_least else ''}{prompt_len} tokens, which leaves no room for a generated token "
               f"(at most {limit - 1} prompt tokens). Please reduce the length of the prompt.", param=param,
               code="context_length_exceeded")


def budget_error(prompt_len: int, max_tokens: int, limit: int, param: str) -> APIError:
    """The prompt fits but the completion asked for does not: both numbers and their sum, as OpenAI words it."""
    return bad(f"This model's maximum context length is {limit} tokens. However, you requested "
               f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
               f"Please reduce the length of the {param} or of the completion.", param="max_tokens",
               code="context_length_exceeded")


# -- field checks ------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get(body: dict, name: str, kind: str, default: Any = None) -> Any:
    v = body.get(name, None)
    if v is None:
        return default
    ok = {"int": _is_int, "num": _is_num, "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
          "dict": lambda x: isinstance(x, dict)}[kind](v)
    if not ok:
        names = {"int": "an integer", "num": "a number", "bool": "a boolean", "str": "a string", "dict": "an object"}
        raise bad(f"'{name}' must be {names[kind]}, got {type(v).__name__} {v!r}"[:300], param=name)
    return v


# Known fields (anything else is refused), and for those that can only be honoured at one value, that value.
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "logit_bias", "logprobs", "user", "response_format", "presence_penalty", "frequency_penalty",
          "top_k", "ignore_eos", "sirocco_inside"}       # sirocco_inside: the chat page's inside channel
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls", "metadata", "store", "service_tier", "modalities", "safety_identifier",
                        "prompt_cache_key", "reasoning_effort", "prediction", "audio", "web_search_options",
                        "verbosity", "functions", "function_call"}
COMPLETION_FIELDS = COMMON | {"prompt", "best_of", "echo", "suffix"}
ONLY = {"presence_penalty": (0,), "frequency_penalty": (0,), "echo": (False,), "store": (False,),
        "service_tier": ("auto", "default"), "modalities": (["text"],)}
NEVER = {"suffix": "'suffix' (insertion) is not supported by this server",
         "prediction": "'prediction' (predicted outputs) is not supported by this server",
         "audio": "audio output is not supported: this server serves a text model",
         "web_search_options": "'web_search_options' is not supported by this server",
         "reasoning_effort": "'reasoning_effort' is not supported: the model does not reason before answering",
         "verbosity": "'verbosity' is not supported by this server",
         "functions": "'functions' is deprecated and not supported: send 'tools' instead",
         "function_call": "'function_call' is deprecated and not supported: send 'tool_choice' instead"}
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")


@dataclass
class Tools:
    """A chat request's tools: OpenAI's tool objects (for the prompt), the functions (for the grammar), the
    choice ("none", "auto", "required" or a function's name) and whether several calls may come at once."""

    tools: list[dict]
    functions: list[Function]
    choice: str
    parallel: bool


@dataclass
class ResponseFormat:
    """``response_format``: "text", "json_object" or "json_schema" (with its schema and strictness)."""

    type: str = "text"
    schema: Optional[dict] = None
    strict: bool = False

    def grammar(self) -> Optional[Grammar]:
        """The grammar of the answer's text, or None for free text. Raises ``APIError`` naming the keyword."""
        try:
            if self.type == "json_object":
                return json_object_grammar()
            if self.type == "json_schema":
                return json_schema_grammar(self.schema, self.strict)
        except GrammarError as e:
            raise schema_error(e, "response_format") from None
        return None


def schema_error(e: GrammarError, param: str) -> APIError:
    return bad(f"{param}: {e}", param=param, code="unsupported_schema_keyword" if e.keyword else "invalid_schema")


@dataclass
class Request:
    """A checked request of either endpoint."""

    chat: bool
    model: Optional[str]
    prompts: list                          # completions: str or list[int] each; chat: one list of messages
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: tuple[str, ...]
    n: int
    logprobs: Optional[int]                # None: no logprobs; k >= 0: that many alternatives per token
    stream: bool
    include_usage: bool
    ignore_eos: bool
    logit_bias: Optional[dict[int, float]] = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    tools: Optional[Tools] = None
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def sampling(self, max_tokens: int, i: int, constraint: Optional[Grammar] = None) -> SamplingParams:
        """Choice i's sampling params (choice i of a seeded request samples with seed + i, like ``generate``)."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=None if self.seed is None else self.seed + i,
                              stop=self.stop, stop_on_eos=not self.ignore_eos, logprobs=self.logprobs or 0,
                              logit_bias=self.logit_bias, constraint=constraint)


def parse(body: Any, chat: bool) -> Request:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _audit(body, chat)
    model = _get(body, "model", "str")
    tools = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content} objects", param="messages")
        prompts = [[_message(m, i) for i, m in enumerate(messages)]]
        _check_tool_ids(prompts[0])
        tools = _tools(body)
        max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        if "prompt" not in body or body["prompt"] is None:
            raise bad("'prompt' is required", param="prompt")
        prompts = _prompts(body["prompt"])
        max_tokens = _get(body, "max_tokens", "int", 16)
        max_name = "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'{max_name}' must be at least 1, got {max_tokens}", param=max_name)
    temperature = _get(body, "temperature", "num", 1.0)
    if temperature < 0 or temperature > 2:
        raise bad(f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    top_p = _get(body, "top_p", "num", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _get(body, "top_k", "int", 0)
    if top_k == -1:
        top_k = 0                          # vLLM's spelling of "no top-k"
    if top_k < 0:
        raise bad(f"'top_k' must be >= 0 (0 or -1 keep every token), got {top_k}", param="top_k")
    seed = _get(body, "seed", "int")
    n = _get(body, "n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise bad(f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of at most 4 strings", param="stop")
    logprobs = _logprobs(body, chat)
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "dict")
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", param="stream_options")
    for key in options or {}:
        if key not in ("include_usage", "include_obfuscation"):
            raise bad(f"Unrecognized argument 'stream_options.{key}'", param="stream_options",
                      code="unknown_parameter")
    include_usage = bool(options and _get(options, "include_usage", "bool", False))
    ignore_eos = _get(body, "ignore_eos", "bool", False)
    logit_bias = _logit_bias(body)
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        _get(body, name, "str")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    return Request(chat=chat, model=model, prompts=prompts, max_tokens=max_tokens, temperature=float(temperature),
                   top_p=float(top_p), top_k=top_k, seed=seed, stop=stop, n=n, logprobs=logprobs, stream=stream,
                   include_usage=include_usage, ignore_eos=ignore_eos, logit_bias=logit_bias,
                   response_format=_response_format(body), tools=tools, id=rid)


def _audit(body: dict, chat: bool) -> None:
    """Refuse what the request asks for and this server cannot honour (see the module docstring)."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, v in body.items():
        if name not in known:
            other = "/v1/completions" if chat and name in COMPLETION_FIELDS else \
                "/v1/chat/completions" if not chat and name in CHAT_FIELDS else None
            where = f" (it belongs to {other})" if other else ""
            raise bad(f"Unrecognized request argument supplied: '{name}'{where}", param=name,
                      code="unknown_parameter")
        if v is None:
            continue
        if name in NEVER:
            raise bad(NEVER[name], param=name, code="unsupported_parameter")
        if name in ONLY and v not in ONLY[name]:
            allowed = " or ".join(repr(a) for a in ONLY[name])
            raise bad(f"'{name}' must be {allowed} on this server, got {v!r}"[:300], param=name,
                      code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad("'best_of' other than 'n' is not supported by this server", param="best_of",
                  code="unsupported_parameter")


def _response_format(body: dict) -> ResponseFormat:
    rf = _get(body, "response_format", "dict")
    if rf is None:
        return ResponseFormat()
    kind = rf.get("type")
    if kind in ("text", "json_object"):
        extra = set(rf) - {"type"}
        if extra:
            raise bad(f"response_format of type {kind!r} takes no {sorted(extra)[0]!r}", param="response_format")
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"[:300],
                  param="response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("response_format.json_schema must be an object with 'name' and 'schema'", param="response_format")
    unknown = set(spec) - {"name", "description", "schema", "strict"}
    if unknown:
        raise bad(f"Unrecognized argument 'response_format.json_schema.{sorted(unknown)[0]}'",
                  param="response_format", code="unknown_parameter")
    name = spec.get("name")
    if not (isinstance(name, str) and FUNCTION_NAME.match(name)):
        raise bad("response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                  param="response_format")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema must be a JSON schema object", param="response_format")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad("response_format.json_schema.strict must be a boolean", param="response_format")
    out = ResponseFormat("json_schema", schema, bool(strict))
    out.grammar()                   # the checks that need no tokenizer, now: a 400 before any other work
    return out


def _tools(body: dict) -> Optional[Tools]:
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if raw is None or raw == []:
        if choice not in (None, "none"):
            raise bad("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        return None
    if not isinstance(raw, list):
        raise bad("'tools' must be a list of {'type': 'function', 'function': {...}} objects", param="tools")
    tools: list[dict] = []
    functions: list[Function] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)):
            raise bad(f"{where} must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}",
                      param=where)
        f = t["function"]
        unknown = set(f) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise bad(f"Unrecognized argument '{where}.function.{sorted(unknown)[0]}'", param=where,
                      code="unknown_parameter")
        name = f.get("name")
        if not (isinstance(name, str) and FUNCTION_NAME.match(name)):
            raise bad(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name!r}"[:300],
                      param=where)
        if name in (g.name for g in functions):
            raise bad(f"{where}: two tools are named {name!r}", param=where)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise bad(f"{where}.function.description must be a string", param=where)
        params = f.get("parameters")
        if params is None:
            params = {**NO_PARAMETERS, "additionalProperties": False}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad(f"{where}.function.parameters must be a JSON schema of an object", param=where)
        strict = f.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad(f"{where}.function.strict must be a boolean", param=where)
        functions.append(Function(name, params, bool(strict)))
        tools.append({"type": "function", "function": {k: v for k, v in f.items() if k != "strict"}})
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if not (choice.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", param="tool_choice")
        choice = fn["name"]
        if choice not in (f.name for f in functions):
            raise bad(f"'tool_choice' names the function {choice!r}, which is not among the tools "
                      f"({', '.join(f.name for f in functions)})", param="tool_choice")
    elif choice not in TOOL_CHOICES:
        raise bad(f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {choice!r}"[:300],
                  param="tool_choice")
    return Tools(tools, functions, choice, True if parallel is None else parallel)


def _check_tool_ids(messages: list[dict]) -> None:
    """Each tool result answers a call made before it."""
    seen: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or ():
            seen.add(c["id"])
        if m["role"] == "tool" and m["tool_call_id"] not in seen:
            raise bad(f"messages[{i}].tool_call_id {m['tool_call_id']!r} answers no call of an earlier assistant "
                      f"message", param=f"messages[{i}].tool_call_id")


def _logit_bias(body: dict) -> Optional[dict[int, float]]:
    """OpenAI's ``logit_bias``: token ids (as strings, JSON's keys) to values in [-100, 100]; None when absent or
    empty. Ids outside the vocabulary are refused by the engine when the request is added."""
    raw = _get(body, "logit_bias", "dict")
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise bad(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias")
        if not _is_num(value) or not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for token {key}",
                      param="logit_bias")
        out[int(key)] = float(value)
    return out


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict):
        raise bad(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "user", "assistant", "developer", "tool"):
        raise bad(f"messages[{i}].role must be one of system, user, assistant, tool, got {role!r}",
                  param=f"messages[{i}].role")
    unknown = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "prefix", "refusal"}
    if unknown:
        raise bad(f"Unrecognized argument 'messages[{i}].{sorted(unknown)[0]}'", param=f"messages[{i}]",
                  code="unknown_parameter")
    if isinstance(content, list):            # content parts: only text parts carry anything a text model reads
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                          param=f"messages[{i}].content")
            texts.append(part["text"])
        content = "\n".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")
    out: dict = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant":
        if m.get("prefix") is not None:
            if not isinstance(m["prefix"], bool):
                raise bad(f"messages[{i}].prefix must be a boolean", param=f"messages[{i}].prefix")
            out["prefix"] = m["prefix"]
        if m.get("tool_calls"):
            out["tool_calls"] = [_tool_call(c, i, j) for j, c in enumerate(m["tool_calls"])]
    elif role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad(f"messages[{i}] (tool) needs 'tool_call_id': the id of the call it answers",
                      param=f"messages[{i}].tool_call_id")
        out["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    if m.get("name") is not None and "name" not in out:
        raise bad(f"messages[{i}].name is not supported: Mistral's chat format has no participant names",
                  param=f"messages[{i}].name", code="unsupported_parameter")
    if m.get("refusal") is not None:
        raise bad(f"messages[{i}].refusal is not supported: send the refusal as the message's content",
                  param=f"messages[{i}].refusal", code="unsupported_parameter")
    for name in ("tool_calls", "tool_call_id", "prefix"):
        if m.get(name) is not None and name not in out and not (name == "tool_calls" and m[name] == []):
            raise bad(f"messages[{i}].{name} is not allowed in a {role} message", param=f"messages[{i}].{name}")
    return out


def _tool_call(c: Any, i: int, j: int) -> dict:
    where = f"messages[{i}].tool_calls[{j}]"
    f = c.get("function") if isinstance(c, dict) else None
    if not (isinstance(f, dict) and isinstance(c.get("id"), str) and c["id"] and c.get("type", "function") ==
            "function" and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
        raise bad(f"{where} must be {{'id': str, 'type': 'function', 'function': {{'name': str, 'arguments': str}}}}",
                  param=where)
    return {"id": c["id"], "type": "function", "function": {"name": f["name"], "arguments": f["arguments"]}}


def _prompts(p: Any) -> list:
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(_is_int(t) for t in p):
            return [list(p)]
        if all(isinstance(s, str) for s in p):
            return list(p)
        if all(isinstance(s, list) and s and all(_is_int(t) for t in s) for s in p):
            return [list(s) for s in p]
    raise bad("'prompt' must be a string, a list of strings, a list of token ids, or a list of lists of token ids "
              "(none empty)", param="prompt")


def _logprobs(body: dict, chat: bool) -> Optional[int]:
    if chat:
        want = _get(body, "logprobs", "bool", False)
        k = _get(body, "top_logprobs", "int")
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param="top_logprobs")
        if k is not None and k > 0 and not want:
            raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (k or 0) if want else None
    v = body.get("logprobs")
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise bad(f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {v!r}",
                  param="logprobs")
    return v


# -- token strings -----------------------------------------------------------------------------------------------
class TokenText:
    """The text and UTF-8 bytes each token id stands for (cached), for logprobs entries."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            text = self.tokenizer.decode([token])
            raw = list(text.encode("utf-8"))
            if "\ufffd" in text:              # a byte-fallback piece <0xAB>: its byte, not U+FFFD's three
                piece = _piece(self.tokenizer, token)
                if piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    raw = [int(piece[3:5], 16)]
            hit = self._cache[token] = (text, raw)
        return hit


def _piece(tokenizer, token: int) -> Optional[str]:
    sp = getattr(tokenizer, "sp", None)
    if sp is not None and hasattr(sp, "id_to_piece"):
        return sp.id_to_piece(token)
    return None


# -- logprobs shapes -------------------------------------------------------------------------------------------
class Logprobs:
    """Accumulates one choice's logprobs in its endpoint's shape; ``add`` returns the entry for a stream chunk."""

    def __init__(self, chat: bool, token_text: TokenText):
        self.chat, self.tt = chat, token_text
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list = []
        self.offsets: list[int] = []
        self.content: list[dict] = []
        self._offset = 0

    def add(self, ev: Event, top: bool) -> dict:
        """The entry of a token event ``ev`` (with its alternatives where ``top``)."""
        assert ev.token is not None and ev.logprob is not None, "a token event"
        token, logprob, alternatives = ev.token, ev.logprob, ev.top if top else None
        text, raw = self.tt(token)
        if self.chat:
            entry = {"token": text, "logprob": logprob, "bytes": raw,
                     "top_logprobs": [{"token": self.tt(t)[0], "logprob": lp, "bytes": self.tt(t)[1]}
                                      for t, lp in (alternatives or [])]}
            self.content.append(entry)
            return {"content": [entry]}
        tops = None if alternatives is None else {self.tt(t)[0]: lp for t, lp in alternatives}
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top.append(tops)
        self.offsets.append(self._offset)
        self._offset += len(text)
        return {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [tops],
                "text_offset": [self.offsets[-1]]}

    def whole(self) -> dict:
        if self.chat:
            return {"content": self.content}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                "text_offset": self.offsets}


# -- response bodies -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens continued from a stored prefix, not pre-filled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(req: Request, model: str, choices: Sequence[dict], use: dict) -> dict:
    obj = "chat.completion" if req.chat else "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": model, "choices": list(choices),
            "usage": use}


def choice(req: Request, index: int, text: str, logprobs: Optional[dict], finish_reason: str,
           tool_calls: Optional[list] = None) -> dict:
    if req.chat:
        message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls else text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(req: Request, model: str, choices: list[dict], use: Optional[dict] = None) -> dict:
    body: dict[str, Any] = {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def chunk_choice(req: Request, index: int, text: Optional[str], logprobs: Optional[dict] = None,
                 finish_reason: Optional[str] = None, role: bool = False, delta: Optional[dict] = None) -> dict:
    """One choice of a stream chunk: ``text`` as its content, or ``delta`` as it is (chat: tool_calls deltas)."""
    if req.chat:
        if delta is None:
            delta = {"role": "assistant"} if role else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta is not None:
        text = delta.get("content", "")
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
