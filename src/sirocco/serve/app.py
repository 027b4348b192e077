"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health, /metrics,
/tokenize and /detokenize; the chat page, its status and its inside streams are added by ``serve.web``.

Order of work in a generation request, cheapest refusal first: the Host header (403) and the body's size (413)
at the door (``doors``), API key (401), the Content-Type (415, before the body is read), JSON and fields (400),
model name (404), room in the waiting queue (429 with Retry-After, before tokenizing), a prompt whose characters
alone prove it past the context (400, before tokenizing: ``Tokenizer.max_chars_per_token``), tokenizing and the
context check (400), then the engine. None of these touches the running requests.

Streams are written as plain server-sent events by a StreamingResponse (``data: {json}\\n\\n`` per chunk, then
``data: [DONE]\\n\\n``), not with sse-starlette: its events end lines with ``\\r\\n`` and it adds pings and
headers of its own, while OpenAI's stream is exactly these lines. A client that goes away is noticed by
listening for ``http.disconnect`` beside the response (streams) or beside the wait for the result
(non-streaming), and the request is aborted at once: the engine frees its row at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SiroccoError
from ..generate import grammar
from ..generate.engine import Completion, Event, PromptTooLong
from ..tokenizer.chat import kept_chars
from . import doors, protocol, web
from .inside import InsideHub, RecorderFactory
from .metrics import Metrics
from .model_thread import ModelThread
from .pipeline import Channel
from .protocol import APIError, Logprobs, TokenText, bad
from .runner import EngineFailed, Runner
from .tools import CallReader

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class EventStream(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect beside the stream and then cancels
    it (Starlette does so only for servers older than ASGI spec 2.4), so the generator's ``finally`` aborts."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        stream = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(listen())
        try:
            done, _ = await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, gone):
                t.cancel()
            await asyncio.gather(stream, gone, return_exceptions=True)
        if stream in done and not stream.cancelled():
            error = stream.exception()
            if error is not None and not isinstance(error, OSError):
                raise error


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The app's state: engine runner, tokenizer, names and limits."""

    def __init__(self, engine, tokenizer, served_model_name: str, api_key: Optional[str] = None,
                 max_queue: int = 128, metrics: Optional[Metrics] = None, channel: Optional[Channel] = None,
                 model_thread: Optional[ModelThread] = None, inside: Optional[RecorderFactory] = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.name = served_model_name
        self.api_key = api_key
        self.max_queue = max_queue
        self.max_seq_len = engine.max_seq_len
        self.metrics = metrics or Metrics()
        self.runner = Runner(engine, self.metrics, channel, model_thread)
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())
        self.max_chars_per_token: Optional[int] = tokenizer.max_chars_per_token()
        self.inside = InsideHub(inside, lambda t: self.token_text(t)[0], web.model_info(self))

    # -- checks ----------------------------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    async def body(self, request: Request) -> Any:
        doors.check_json(request.headers.get("content-type"))
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'.",
                           param="model", code="model_not_found")

    def check_queue(self, sequences: int) -> None:
        waiting = self.runner.waiting()
        if waiting + sequences > self.max_queue:
            raise APIError(429, f"The server is busy: {waiting} sequences are waiting and the queue holds at most "
                                f"{self.max_queue}. Retry after {RETRY_AFTER_S} s.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_chars(self, chars: int, param: str) -> None:
        """Refuse, untokenized, a prompt of ``chars`` characters (BOS and its text) that cannot fit the context:
        it has at least 1 + ceil(chars / max_chars_per_token) tokens (see ``tokenizer.base``)."""
        if self.max_chars_per_token is None:
            return
        at_least = 1 + -(-chars // self.max_chars_per_token)
        if at_least >= self.max_seq_len:
            raise protocol.context_error(at_least, self.max_seq_len, param, at_least=True)

    def encode(self, prompt: Any, param: str) -> list[int]:
        if isinstance(prompt, str):
            self.check_chars(len(prompt), param)
            ids = self.tokenizer.encode(prompt, bos=True, eos=False)
        else:
            ids = [int(t) for t in prompt]
            out = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
            if out:
                raise bad(f"token ids outside the vocabulary of {self.tokenizer.vocab_size}: {out[:5]}", param=param)
        if len(ids) >= self.max_seq_len:
            raise protocol.context_error(len(ids), self.max_seq_len, param)
        return ids

    def encode_chat(self, messages: list[dict], tools: Optional[protocol.Tools] = None) -> list[int]:
        self.check_chars(kept_chars(messages), "messages")
        try:
            ids = self.tokenizer.encode_chat(messages, tools.tools if tools else None)
        except SiroccoError as e:
            raise bad(str(e), param="messages") from None
        if len(ids) >= self.max_seq_len:
            raise protocol.context_error(len(ids), self.max_seq_len, "messages")
        return ids

    async def constraint(self, req: protocol.Request) -> Optional[grammar.Grammar]:
        """The grammar every choice of ``req`` follows (response_format, tools), checked against this tokenizer:
        a 400 naming the field and the keyword it cannot enforce. Compiled off the event loop (a large schema
        takes milliseconds) and cached, so the engine thread's copy is cheap."""
        vocab = self.engine.args.vocab_size
        rf, tools = req.response_format, req.tools
        checks: list[tuple[grammar.Grammar, str]] = []
        try:
            text = rf.grammar()
            if text is not None:
                checks.append((text, "response_format"))
            final = text
            if tools is not None:
                why = getattr(self.tokenizer, "tools_unsupported", None)
                if why:
                    raise bad(f"tools are not supported with this model's tokenizer: {why}", param="tools")
                for i, f in enumerate(tools.functions):
                    checks.append((grammar.json_schema_grammar(f.parameters, f.strict),
                                   f"tools[{i}].function.parameters"))
                text_schema = None
                if rf.type == "json_object":
                    text_schema = {"type": "object"}
                elif rf.type == "json_schema":
                    text_schema = grammar.prepare_schema(rf.schema, rf.strict)
                final = grammar.tool_calls_grammar(tools.functions, tools.choice, tools.parallel,
                                                   getattr(self.tokenizer, "tool_calls_id", None), text_schema)
                checks.append((final, "tools"))
        except grammar.GrammarError as e:
            raise protocol.schema_error(e, "tools") from None
        for g, param in checks:
            try:
                await asyncio.to_thread(grammar.check, g, self.tokenizer, vocab)
            except grammar.GrammarError as e:
                raise protocol.schema_error(e, param) from None
        return final

    # -- generation ------------------------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool) -> Response:
        arrival = time.perf_counter()
        self.auth(request)
        body = await self.body(request)
        req = protocol.parse(body, chat=chat)
        self.check_model(req.model)
        inside = self.inside.requested(body, req.n * len(req.prompts))
        wrong = [t for t in req.logit_bias or () if not 0 <= t < self.tokenizer.vocab_size]
        if wrong:
            raise bad(f"'logit_bias' names token ids outside the vocabulary of {self.tokenizer.vocab_size}: "
                      f"{wrong[:5]}", param="logit_bias")
        self.check_queue(req.n * len(req.prompts))
        constraint = await self.constraint(req)
        if chat:
            prompts = [self.encode_chat(req.prompts[0], req.tools)]
        else:
            for p in req.prompts:                   # every prompt's length, before tokenizing any of them
                if isinstance(p, str):
                    self.check_chars(len(p), "prompt")
            prompts = [self.encode(p, "prompt") for p in req.prompts]
        if req.max_tokens is not None:
            for ids in prompts:
                if len(ids) + req.max_tokens > self.max_seq_len:
                    raise protocol.budget_error(len(ids), req.max_tokens, self.max_seq_len,
                                                "messages" if chat else "prompt")
        out: asyncio.Queue = asyncio.Queue()
        seqs = []                                   # (choice index, request id, prompt ids)
        for pi, ids in enumerate(prompts):
            for j in range(req.n):
                index = pi * req.n + j
                seqs.append((index, f"{req.id}-{index}", ids))
        added: list[str] = []
        observer = None
        try:
            for index, rid, ids in seqs:
                max_tokens = req.max_tokens if req.max_tokens is not None else self.max_seq_len - len(ids)
                params = req.sampling(max_tokens, index, constraint)
                observer = None if inside is None else self.inside.observer(inside, rid, len(ids), max_tokens)
                added.append(rid)
                await self.runner.add(rid, ids, params, out, arrival, observer=observer)
        except BaseException as e:
            for rid in added:
                self.runner.abort(rid)
            if observer is not None and isinstance(e, Exception):      # refused: the page's panel hears no step
                observer.finish("error")
            if isinstance(e, PromptTooLong):
                raise bad(str(e), param="messages" if chat else "prompt", code="context_length_exceeded") from None
            if isinstance(e, (SiroccoError, ValueError)):
                raise bad(str(e)) from None
            if isinstance(e, EngineFailed):
                raise APIError(503, str(e), type="server_error") from None
            raise
        rids = {rid: index for index, rid, _ in seqs}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            return EventStream(self._stream(req, rids, out, prompt_tokens))
        work = asyncio.ensure_future(self._collect(req, rids, out, prompt_tokens))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():                     # the client went away (or this handler was cancelled)
                work.cancel()
                for rid in rids:
                    self.runner.abort(rid)
        if not work.done() or work.cancelled():
            return Response(status_code=499)        # nobody reads it
        return JSONResponse(work.result())

    async def _events(self, rids: dict[str, int], out: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, Event) until every sequence of the request has finished."""
        left = set(rids)
        while left:
            ev = await out.get()
            if isinstance(ev, BaseException):           # the engine stopped or failed
                raise APIError(503, str(ev), type="server_error")
            if ev.completion is not None:
                left.discard(ev.request_id)
            yield rids[ev.request_id], ev

    async def _collect(self, req: protocol.Request, rids: dict[str, int], out: asyncio.Queue,
                       prompt_tokens: int) -> dict:
        logprobs = {i: Logprobs(req.chat, self.token_text) for i in rids.values()}
        readers = self._readers(req, rids)
        done: dict[int, Completion] = {}
        async for index, ev in self._events(rids, out):
            if req.logprobs is not None and ev.token is not None:
                logprobs[index].add(ev, top=bool(req.logprobs))
            if readers:
                readers[index].feed(ev.token, ev.text)
            if ev.completion is not None:
                done[index] = ev.completion
                if readers:
                    readers[index].finish()
        choices = []
        for i in sorted(done):
            reader = readers[i] if readers else None
            calls = reader.calls if reader is not None and reader.is_call else None
            choices.append(protocol.choice(req, i, done[i].text,
                                           logprobs[i].whole() if req.logprobs is not None else None,
                                           _finish(done[i], calls), calls))
        used = sum(len(c.tokens) for c in done.values())
        return protocol.response(req, self.name, choices,
                                 protocol.usage(prompt_tokens, used, cached_tokens(req.n, done)))

    async def _stream(self, req: protocol.Request, rids: dict[str, int], out: asyncio.Queue,
                      prompt_tokens: int) -> AsyncIterator[str]:
        finished: set[str] = set()
        done: dict[int, Completion] = {}
        used = 0
        logprobs = {i: Logprobs(req.chat, self.token_text) for i in rids.values()}
        try:
            if req.chat:
                for i in sorted(rids.values()):
                    yield sse(protocol.chunk(req, self.name, [protocol.chunk_choice(req, i, None, role=True)]))
            readers = self._readers(req, rids)
            try:
                async for index, ev in self._events(rids, out):
                    lp = None
                    if ev.token is not None:
                        used += 1
                        if req.logprobs is not None:
                            lp = logprobs[index].add(ev, top=bool(req.logprobs))
                    if readers:
                        reader = readers[index]
                        deltas = reader.feed(ev.token, ev.text)
                        if ev.completion is not None:
                            deltas += reader.finish()
                        for j, delta in enumerate(deltas or ([{}] if lp is not None else [])):
                            yield sse(protocol.chunk(req, self.name, [protocol.chunk_choice(
                                req, index, None, lp if j == 0 else None, delta=delta)]))
                    elif ev.token is not None:
                        if ev.text or lp is not None:
                            yield sse(protocol.chunk(req, self.name, [protocol.chunk_choice(req, index, ev.text, lp)]))
                    elif ev.text:
                        yield sse(protocol.chunk(req, self.name, [protocol.chunk_choice(req, index, ev.text)]))
                    if ev.completion is not None:
                        finished.add(ev.request_id)
                        done[index] = ev.completion
                        calls = readers[index].calls if readers and readers[index].is_call else None
                        yield sse(protocol.chunk(req, self.name, [protocol.chunk_choice(
                            req, index, None, finish_reason=_finish(ev.completion, calls))]))
            except APIError as e:
                yield sse(e.body())
            if req.include_usage:
                yield sse(protocol.chunk(req, self.name, [], protocol.usage(prompt_tokens, used,
                                                                            cached_tokens(req.n, done))))
            yield "data: [DONE]\n\n"
        finally:
            for rid in set(rids) - finished:
                self.runner.abort(rid)

    def _readers(self, req: protocol.Request, rids: dict[str, int]) -> Optional[dict[int, CallReader]]:
        """A tool-call reader per choice where the answer may be calls."""
        if req.tools is None or req.tools.choice == "none":
            return None
        marker = getattr(self.tokenizer, "tool_calls_id", None)
        return {i: CallReader(marker) for i in rids.values()}

    # -- the other routes ------------------------------------------------------------------------------------
    def models(self, request: Request) -> dict:
        self.auth(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "sirocco", "max_model_len": self.max_seq_len}]}

    async def tokenize(self, request: Request) -> dict:
        self.auth(request)
        body = await self.body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        self.check_model(protocol._get(body, "model", "str"))
        if body.get("messages") is not None:
            req = protocol.parse({k: body[k] for k in ("messages", "tools") if k in body}, chat=True)
            try:
                ids = self.tokenizer.encode_chat(req.prompts[0], req.tools.tools if req.tools else None)
            except SiroccoError as e:
                raise bad(str(e), param="messages") from None
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("'prompt' (a string) or 'messages' is required", param="prompt")
            special = protocol._get(body, "add_special_tokens", "bool", True)
            ids = self.tokenizer.encode(prompt, bos=special, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_seq_len}

    async def detokenize(self, request: Request) -> dict:
        self.auth(request)
        body = await self.body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        self.check_model(protocol._get(body, "model", "str"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(protocol._is_int(t) for t in tokens):
            raise bad("'tokens' must be a list of token ids", param="tokens")
        bad_ids = [t for t in tokens if not 0 <= t < self.tokenizer.vocab_size]
        if bad_ids:
            raise bad(f"token ids outside the vocabulary of {self.tokenizer.vocab_size}: {bad_ids[:5]}",
                      param="tokens")
        return {"prompt": self.tokenizer.decode(tokens)}


def cached_tokens(n: int, done: dict[int, Completion]) -> int:
    """The prompt tokens a request did not pre-fill: per prompt (choices ``p * n .. p * n + n - 1``), the fewest
    its choices continued from the prefix store, summed over prompts (``prompt_tokens`` counts each prompt once).

    >>> from sirocco.generate.engine import Completion
    >>> cs = {i: Completion(i, None, [], cached_tokens=c) for i, c in enumerate([8, 8, 0, 5])}
    >>> cached_tokens(2, cs), cached_tokens(1, cs)
    (8, 21)
    """
    per_prompt: dict[int, int] = {}
    for i, c in done.items():
        p = i // n
        per_prompt[p] = min(per_prompt.get(p, c.cached_tokens), c.cached_tokens)
    return sum(per_prompt.values())


def _finish(c: Completion, calls: Optional[list]) -> str:
    """OpenAI's finish_reason: a complete answer that is calls is "tool_calls"."""
    reason = c.finish_reason or "stop"
    return "tool_calls" if calls and reason == "stop" else reason


def build_app(engine, tokenizer, served_model_name: str, api_key: Optional[str] = None, max_queue: int = 128,
              metrics: Optional[Metrics] = None, channel: Optional[Channel] = None,
              model_thread: Optional[ModelThread] = None, bind_host: str = "127.0.0.1",
              allowed_hosts: Sequence[str] = (), allow_origins: Sequence[str] = (),
              max_body: int = doors.DEFAULT_MAX_BODY_MIB * doors.MIB,
              inside: Optional[RecorderFactory] = None) -> FastAPI:
    """The ASGI app over ``engine``. The engine loop starts and stops with the app's lifespan, on
    ``model_thread`` if given (the thread that loaded the model: see ``serve.model_thread``). ``channel``: rank 0's
    ``PipelineChannel`` when the engine is one of a pipeline's (see ``serve.pipeline``). ``bind_host`` (the
    address the server listens on) and ``allowed_hosts`` say which Host headers are answered, ``allow_origins``
    which web origins get CORS headers (none by default), ``max_body`` the largest request body in bytes: see
    ``serve.doors``. ``inside``: makes the recorder of a request the chat page's inside panel follows
    (``viz.inside.RowTrace``; None: no panel)."""
    server = Server(engine, tokenizer, served_model_name, api_key, max_queue, metrics, channel, model_thread,
                    inside)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.runner.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.runner.stop)

    app = FastAPI(title="sirocco", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=doors.middleware(bind_host, allowed_hosts, allow_origins, max_body))
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        return server.models(request)

    @app.get("/health")
    async def health():
        if server.runner.failed is not None:
            return JSONResponse({"status": "error", "error": str(server.runner.failed)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await server.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await server.detokenize(request)

    web.add_routes(app, server, EventStream)
    return app
