"""``sirocco serve``'s doors, as a web browser and a flood see them (serve/doors.py): JSON only as
application/json (415), Host headers that name this server (403: DNS rebinding), CORS only for the origins named,
a cap on request bodies (413, with or without a Content-Length), and a prompt whose characters alone prove it
past the context refused before it is tokenized. Real servers on 127.0.0.1 over a tiny random Mistral with the
bundled sentencepiece tokenizer (16 characters per token at most, a context of 2048)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from serve_fixtures import serve, write_checkpoint
from sirocco.serve.doors import Hosts, host_name
from sirocco.serve.protocol import APIError

pytestmark = pytest.mark.usefixtures("one_thread")

JSON_ROUTES = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "Hi"}),
    ("/detokenize", {"tokens": [1, 5]}),
]
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mistral", tmp_path_factory.mktemp("doors") / "tiny-mistral")


@pytest.fixture(scope="module")
def plain(ckpt):
    """A server as started with no options: 127.0.0.1, no key, no CORS, the default body cap."""
    with serve(ckpt, "--max-rows", "2") as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def opened(ckpt):
    """A server that lists more Host names, one web origin, and a body cap of 1 MiB."""
    with serve(ckpt, "--max-rows", "2", "--allowed-hosts", "models.lan,*.corp.example", "--allowed-hosts",
               "gpu-box:8000", "--allow-origin", ORIGIN, "--max-body-mib", "1") as (url, server):
        yield url, server


def error_of(r: httpx.Response, status: int, code: str) -> str:
    """The message of an OpenAI-shaped error with this status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err["message"]


def raw_http(url: str, data: bytes, more=()) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (then each chunk of ``more`` until the server answers) on a fresh connection and read one
    response: status, headers (lower-case names), body. For what httpx would not send: a Content-Length larger
    than what follows, no Host header, a body cut short."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(data)
        s.setblocking(False)
        got = b""
        for chunk in more:
            try:
                got += s.recv(65536)
                break                                # it answered: stop sending
            except BlockingIOError:
                s.setblocking(True)
                s.sendall(chunk)
                s.setblocking(False)
        s.setblocking(True)
        while b"\r\n\r\n" not in got:
            block = s.recv(65536)
            assert block, got
            got += block
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


# -- content type ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", JSON_ROUTES, ids=[p for p, _ in JSON_ROUTES])
def test_json_is_taken_only_as_application_json(plain, path, body):
    url = plain[0]
    data = json.dumps(body).encode()
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", None):                  # what a page may send unasked
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(url + path, content=data, headers=headers, timeout=30)
        assert "application/json" in error_of(r, 415, "unsupported_media_type")
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(url + path, content=data, headers={"content-type": kind}, timeout=60)
        assert r.status_code == 200, (kind, r.text)


def test_415_comes_before_the_body_is_read(plain):
    """The text/plain request declares a body it never sends: the answer cannot have waited for it."""
    status, _, body = raw_http(plain[0], b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Content-Type: text/plain\r\nContent-Length: 1000\r\n\r\n{\"pro")
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_media_type"


def test_the_openai_client_and_curls_json_keep_working(plain):
    c = openai.OpenAI(base_url=plain[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert c.completions.create(model="tiny-mistral", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    chat = c.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.usage.completion_tokens == 2


# -- Host --------------------------------------------------------------------------------------------------------
def test_host_names_that_are_not_this_server_get_403_on_every_route(plain):
    url, port = plain[0], urlsplit(plain[0]).port
    for host in ("evil.example.com", f"evil.example.com:{port}", "localhost.evil.example.com", "192.168.1.5",
                 f"127.0.0.2:{port}"):
        for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("OPTIONS", "/v1/completions"), ("GET", "/nothing")):
            r = httpx.request(method, url + path, headers={"Host": host}, json={"prompt": "Hi"}, timeout=30)
            message = error_of(r, 403, "host_not_allowed")
            assert "--allowed-hosts " + host_name(host) in message, message
    for host in ("localhost", f"localhost:{port}", "LocalHost", "localhost.", f"127.0.0.1:{port}", f"[::1]:{port}",
                 "[::1]"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    r = httpx.post(url + "/v1/completions", headers={"Host": f"localhost:{port}"}, timeout=60,
                   json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_request_without_host_is_answered(plain):
    """HTTP/1.0 needs no Host; no browser sends a request without one, so it cannot be a rebinding page."""
    status, _, body = raw_http(plain[0], b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_allowed_hosts_add_names_and_domains(opened):
    url, port = opened[0], urlsplit(opened[0]).port
    for host in (f"models.lan:{port}", "MODELS.LAN", "a.corp.example", f"x.y.corp.example:{port}", "gpu-box",
                 f"localhost:{port}"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    for host in ("corp.example", "evil.example.com", "models.lan.evil.example", "acorp.example"):
        error_of(httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30), 403, "host_not_allowed")


def test_which_hosts_each_binding_answers():
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:8000", "::1", "example.com.", "[fe80::1]")] == \
        ["localhost", "::1", "::1", "example.com", "fe80::1"]
    loopback = Hosts("127.0.0.1")
    assert all(loopback.allows(h) for h in ("localhost:1", "127.0.0.1", "[::1]:8000", None))
    assert not any(loopback.allows(h) for h in ("10.0.0.7:8000", "evil.example.com", "[fe80::1]", ""))
    lan = Hosts("192.168.1.5")
    assert lan.allows("192.168.1.5:8000") and lan.allows("localhost") and not lan.allows("192.168.1.6")
    for everywhere in (Hosts("0.0.0.0"), Hosts("::")):          # exposed on purpose: any address, names listed
        assert all(everywhere.allows(h) for h in ("10.0.0.7:8000", "[fe80::1]:80", "172.17.0.1", "localhost"))
        assert not everywhere.allows("evil.example.com") and not everywhere.allows("box.lan")
        assert "any IP address" in everywhere.describe()
    assert Hosts("0.0.0.0", ["box.lan"]).allows("box.lan:8000")
    assert Hosts("127.0.0.1", ["*"]).allows("evil.example.com") and Hosts("::1").describe().startswith("localhost")


# -- CORS --------------------------------------------------------------------------------------------------------
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def test_no_cors_headers_by_default(plain):
    url = plain[0]
    for origin in (ORIGIN, "https://evil.example", "null"):
        r = httpx.options(url + "/v1/completions", headers={"Origin": origin, **PREFLIGHT}, timeout=30)
        assert not 200 <= r.status_code < 300 and cors_headers(r) == {}, (r.status_code, r.headers)
        r = httpx.get(url + "/v1/models", headers={"Origin": origin}, timeout=30)
        assert r.status_code == 200 and cors_headers(r) == {}
        r = httpx.post(url + "/v1/completions", headers={"Origin": origin}, json={"prompt": "Hi", "max_tokens": 1},
                       timeout=60)
        assert r.status_code == 200 and cors_headers(r) == {}


def test_allow_origin_gives_cors_to_that_origin_alone(opened):
    url = opened[0]
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed and "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(url + "/v1/completions", headers={"Origin": ORIGIN}, json={"prompt": "Hi", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    for other in ("https://evil.example", "http://app.example", "https://app.example:8443"):
        r = httpx.options(url + "/v1/completions", headers={"Origin": other, **PREFLIGHT}, timeout=30)
        assert r.status_code != 200 and "access-control-allow-origin" not in r.headers
        r = httpx.get(url + "/v1/models", headers={"Origin": other}, timeout=30)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# -- body cap ----------------------------------------------------------------------------------------------------
@pytest.fixture
def body_spy(monkeypatch):
    """Records, for each server it is given, every body its JSON routes got past the door, and every refusal."""
    seen: dict[str, list] = {"parsed": [], "refused": []}

    def install(server):
        body = server.body

        async def spy(request):
            try:
                parsed = await body(request)
            except APIError as e:
                seen["refused"].append(e.status)
                raise
            seen["parsed"].append(len(json.dumps(parsed)))
            return parsed
        monkeypatch.setattr(server, "body", spy)
        return seen
    return install


def test_a_declared_body_over_the_cap_gets_413_before_it_is_sent(opened, plain, body_spy):
    for (url, server), declared in ((opened, 2**20 + 1), (plain, 60 * 10**6)):    # 1 MiB cap; default 16 MiB
        seen = body_spy(server)
        status, _, body = raw_http(url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                        b"application/json\r\nContent-Length: %d\r\n\r\n{\"prompt\": \"" % declared)
        assert status == 413
        err = json.loads(body)["error"]
        assert err["code"] == "request_too_large" and "--max-body-mib" in err["message"], err
        assert seen == {"parsed": [], "refused": []}                  # the route never ran
    r = httpx.post(opened[0] + "/v1/completions", json={"prompt": "x" * (2**20 + 10)}, timeout=60)
    error_of(r, 413, "request_too_large")                             # the whole body sent anyway: still 413


def test_a_chunked_body_is_cut_off_at_the_cap(opened, body_spy):
    url, server = opened
    seen = body_spy(server)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"[" + b"1," * 32767 + b"1]"                              # 64 KiB
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 48            # 3 MiB offered, never ended
    status, _, body = raw_http(url, head, chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert seen["parsed"] == [] and seen["refused"] == [413]

    def stream():                                                     # httpx sends a generator chunked
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'
    error_of(httpx.post(url + "/v1/completions", content=stream(), headers={"content-type": "application/json"},
                        timeout=60), 413, "request_too_large")
    assert seen["parsed"] == [] and seen["refused"] == [413, 413]
    ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)   # still serving
    assert ok.status_code == 200 and seen["parsed"]


def test_a_body_under_the_cap_passes_the_door(opened):
    ids = [7] * 300_000                                               # 900 KB of JSON: fits 1 MiB, not the context
    message = error_of(httpx.post(opened[0] + "/v1/completions", json={"prompt": ids}, timeout=60), 400,
                       "context_length_exceeded")
    assert "300000 tokens" in message


# -- a prompt past the context, refused untokenized ---------------------------------------------------------------
@pytest.fixture
def encode_spy(plain, monkeypatch):
    """Counts the server tokenizer's calls to encode text (every path of encode and encode_chat runs through
    ``_encode_text``, or mistral-common's chat encoder, which this tokenizer does not use)."""
    tok = plain[1].tokenizer
    calls = []
    encode_text, encode_chat = tok._encode_text, tok.encode_chat

    def spy_text(text):
        calls.append(len(text))
        return encode_text(text)

    def spy_chat(messages):
        calls.append(sum(len(m["content"]) for m in messages))
        return encode_chat(messages)
    monkeypatch.setattr(tok, "_encode_text", spy_text)
    monkeypatch.setattr(tok, "encode_chat", spy_chat)
    return calls


def test_a_huge_prompt_is_refused_before_tokenizing(plain, encode_spy):
    url, server = plain
    assert server.tokenizer.max_chars_per_token() == 16 and server.max_seq_len == 2048
    huge = "the sliding window " * 500_000                             # 9.5 MB: inside the body cap
    for path, body, param, chars in (
            ("/v1/completions", {"prompt": huge}, "prompt", len(huge)),
            ("/v1/completions", {"prompt": ["a short one first", huge]}, "prompt", len(huge)),
            ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": huge}]}, "messages",
             len("Be brief.") + len(huge.strip()))):                   # the whitespace at a content's ends may go
        want = 1 + -(-chars // 16)
        t0 = time.perf_counter()
        r = httpx.post(url + path, json=body, timeout=60)
        message = error_of(r, 400, "context_length_exceeded")
        assert r.json()["error"]["param"] == param
        assert f"at least {want} tokens" in message and "2048" in message, message
        assert encode_spy == [], "tokenized before refusing"
        assert time.perf_counter() - t0 < 30
    # just over the context by its characters (2047 * 16 characters make at least 2048 tokens): refused untokenized
    r = httpx.post(url + "/v1/completions", json={"prompt": "=" * (2047 * 16)}, timeout=60)
    assert "at least 2048 tokens" in error_of(r, 400, "context_length_exceeded") and encode_spy == []
    # one whose characters prove nothing is tokenized, and refused with its exact count
    r = httpx.post(url + "/v1/completions", json={"prompt": "a b " * 2000}, timeout=60)
    message = error_of(r, 400, "context_length_exceeded")
    assert "at least" not in message and encode_spy == [8000]
    n = len(server.tokenizer.encode("a b " * 2000))
    assert f"has {n} tokens" in message
