"""``sirocco serve`` end to end: real servers on 127.0.0.1 (in-process uvicorn, and one ``sirocco serve``
subprocess), the ``openai`` client and raw httpx, over tiny random Mistral and Mixtral checkpoints in fp32
with a real sentencepiece tokenizer. What the server answers must be what ``sirocco generate --json`` prints."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_fixtures import (
    assert_solo_under_load,
    check_chat_reuse,
    free_port,
    generate_json,
    metric,
    mixed_jobs,
    serve,
    write_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The sliding window", "Hello", "A rolling buffer cache keeps the last W keys and values of every "
           "layer, so memory stays bounded while the sequence grows past the window."]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {kind: write_checkpoint(kind, root / f"tiny-{kind}") for kind in ("mistral", "mixtral")}


@pytest.fixture(scope="module")
def mistral(ckpts):
    with serve(ckpts["mistral"], "--max-rows", "4", "--max-queue", "64") as (url, server):
        yield url, server


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def sse_lines(url: str, path: str, body: dict) -> list[str]:
    """The raw ``data:`` payloads of one streamed response (comment lines skipped)."""
    out = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        out.append(block[len("data: "):])
    assert raw.endswith("data: [DONE]\n\n")
    return out


# -- equal to generate --json ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_greedy_text_and_logprobs_equal_generate_json(ckpts, kind, mistral):
    want = generate_json(ckpts[kind], PROMPTS, "--max-tokens", "12")
    ctx = serve(ckpts[kind], "--max-rows", "2") if kind == "mixtral" else None
    url = mistral[0]
    with (ctx or _nothing()) as started:
        if started:
            url = started[0]
        c = client(url)
        model = c.models.list().data[0].id
        assert model == f"tiny-{kind}"
        r = c.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=1)
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        for ch, w in zip(r.choices, want):
            assert ch.text == w["text"] and ch.finish_reason == w["finish_reason"]
            assert len(ch.logprobs.token_logprobs) == len(w["tokens"])
            assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(ch.logprobs.token_logprobs, w["logprobs"]))
        assert r.usage.prompt_tokens == sum(len(w["prompt_tokens"]) for w in want)
        assert r.usage.completion_tokens == sum(len(w["tokens"]) for w in want)
        # the same prompts one by one, streamed: the same text
        for p, w in zip(PROMPTS, want):
            s = c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in s) == w["text"]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_chat_equals_generate_chat(ckpts, mistral):
    question = "What is a sliding window?"
    want = generate_json(ckpts["mistral"], [question], "--chat", "--max-tokens", "10")[0]
    c = client(mistral[0])
    r = c.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": question}],
                                  max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content == want["text"]
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(want["prompt_tokens"])
    content = ch.logprobs.content
    assert len(content) == len(want["tokens"]) == r.usage.completion_tokens
    for entry, lp in zip(content, want["logprobs"]):
        assert math.isclose(entry.logprob, lp, abs_tol=1e-5)
        assert entry.bytes is not None and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one, and the alternatives come in order
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    # max_completion_tokens is the newer name of max_tokens
    r2 = c.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": question}],
                                   max_completion_tokens=10, temperature=0)
    assert r2.choices[0].message.content == want["text"]


def test_a_chat_turn_continues_from_the_last_ones_state(ckpts, mistral):
    check_chat_reuse(mistral[0], ckpts["mistral"], "tiny-mistral")
    assert mistral[1].engine.prefix is not None


def test_without_a_prefix_store_nothing_is_cached(ckpts):
    with serve(ckpts["mixtral"], "--prefix-cache-mib", "0") as (url, server):
        body = dict(model="tiny-mixtral", prompt=PROMPTS[2], max_tokens=2, temperature=0)
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
            assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert server.engine.prefix is None
        assert metric(httpx.get(url + "/metrics").text, "sirocco_prefix_cache_hit_tokens_total") == 0


# -- concurrency --------------------------------------------------------------------------------------------------
def test_concurrent_streams_get_their_solo_output(mistral):
    assert_solo_under_load(mistral[0], mixed_jobs(15, span=21, seeded_tokens=16))


def test_stream_and_non_stream_agree_and_chunks_have_openai_shapes(mistral):
    url = mistral[0]
    body = dict(model="tiny-mistral", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.8,
                seed=5, n=2)
    full = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    lines = sse_lines(url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert all("usage" not in c for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant"}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == full["choices"][index]["finish_reason"]
        assert all(m["finish_reason"] is None and set(m["delta"]) == {"content"} for m in mine[1:-1])
        assert "".join(m["delta"]["content"] for m in mine[1:-1]) == full["choices"][index]["message"]["content"]
    # completions: the same rules, no role chunk; no usage chunk unless asked
    body = dict(model="tiny-mistral", prompt="Hi", max_tokens=5, temperature=0)
    full = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert full["object"] == "text_completion" and full["usage"]["completion_tokens"] == 5
    lines = sse_lines(url, "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["text"] == "" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_stop_strings_split_across_tokens_stop_exactly(mistral):
    c = client(mistral[0])
    base = c.completions.create(model="tiny-mistral", prompt="Stop here", max_tokens=24, temperature=0, logprobs=0,
                                extra_body={"ignore_eos": True})
    text, pieces = base.choices[0].text, base.choices[0].logprobs.tokens
    # a stop string made of the end of token 5 and the start of token 6
    k = 5
    while len(pieces[k]) < 2 or len(pieces[k + 1]) < 2:
        k += 1
    cut = sum(len(p) for p in pieces[: k + 1])
    stop = text[cut - 2: cut + 2]
    want = text[: text.find(stop)]
    r = c.completions.create(model="tiny-mistral", prompt="Stop here", max_tokens=24, temperature=0, stop=[stop, "@@"],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model="tiny-mistral", prompt="Stop here", max_tokens=24, temperature=0, stop=stop,
                             stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in s) == want


def test_n_and_logprobs_shapes(mistral):
    c = client(mistral[0])
    r = c.completions.create(model="tiny-mistral", prompt="Two", n=2, max_tokens=8, temperature=1.0, seed=3,
                             logprobs=3)
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].text != r.choices[1].text
    for ch in r.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert r.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in r.choices)
    raw = httpx.post(mistral[0] + "/v1/chat/completions", timeout=60, json=dict(
        model="tiny-mistral", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True)).json()
    content = raw["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and
                                     e["top_logprobs"] == [] for e in content)
    assert raw["choices"][0]["logprobs"].keys() == {"content"}


# -- errors ---------------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "tiny-mistral"}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"the": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5000": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": [5000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny-mistral"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
]


def test_logit_bias_forces_a_token_and_logprobs_stay_the_model_s(mistral):
    c = client(mistral[0])
    plain = c.completions.create(model="tiny-mistral", prompt="The sliding window", max_tokens=4, temperature=0,
                                 logprobs=1)
    forced = c.completions.create(model="tiny-mistral", prompt="The sliding window", max_tokens=4, temperature=0,
                                  logprobs=1, logit_bias={"123": 100})
    piece = httpx.post(mistral[0] + "/detokenize", json={"tokens": [123]}, timeout=30).json()["prompt"]
    assert forced.choices[0].logprobs.tokens == [piece] * 4 != plain.choices[0].logprobs.tokens
    # the first token's log-probability is of the same unbiased distribution in both
    assert forced.choices[0].logprobs.top_logprobs[0] == plain.choices[0].logprobs.top_logprobs[0]


def test_bad_inputs_get_their_status_and_error_body_and_the_server_keeps_serving(mistral):
    url = mistral[0]
    long_run = httpx.Client(timeout=60)
    with long_run.stream("POST", url + "/v1/completions", json={"prompt": "running", "max_tokens": 200,
                                                                "ignore_eos": True, "stream": True}) as running:
        lines = running.iter_lines()
        first = next(lines)                                  # a request in flight all along
        for path, body, status, param in BAD:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = httpx.post(url + path, timeout=30, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert err["param"] == param, (body, err)
        # past the context: 400 naming both numbers
        r = httpx.post(url + "/v1/completions", json={"prompt": [1] * 3000}, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded"
        assert "2048" in err["message"] and "3000" in err["message"]
        # the prompt fits, the completion asked for does not: 400 with the prompt, the completion and their sum
        r = httpx.post(url + "/v1/completions", json={"prompt": [1] * 2000, "max_tokens": 49}, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert all(str(n) in err["message"] for n in (2048, 2049, 2000, 49)), err["message"]
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048})
        assert r.status_code == 400 and "in the messages" in r.json()["error"]["message"]
        rest = [line for line in lines if line]
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    ok = client(url).completions.create(model="tiny-mistral", prompt="still here", max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert httpx.get(url + "/v1/nothing").status_code == 404


def test_a_client_that_disconnects_frees_its_row(mistral):
    url = mistral[0]
    before = httpx.get(url + "/metrics").text
    aborted0 = metric(before, "sirocco_request_success_total", 'finish_reason="abort"')
    # streaming: read a few chunks, then hang up
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    # non-streaming: give up after a moment
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", timeout=0.5, json={"prompt": "long", "max_tokens": 2000,
                                                              "ignore_eos": True})
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "sirocco_request_success_total", 'finish_reason="abort"') == aborted0 + 2:
            break
        assert time.monotonic() < deadline, "the disconnected requests were not aborted"
        time.sleep(0.05)
    assert metric(text, "sirocco_requests_running") == 0 and metric(text, "sirocco_requests_waiting") == 0
    generated = metric(text, "sirocco_generation_tokens_total")
    time.sleep(0.3)
    assert metric(httpx.get(url + "/metrics").text, "sirocco_generation_tokens_total") == generated
    assert mistral[1].runner.engine.num_running == 0


def test_past_max_queue_429_at_once_and_the_admitted_finish(ckpts):
    with serve(ckpts["mistral"], "--max-rows", "1", "--max-queue", "1") as (url, server):
        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as h:
                body = {"prompt": "queued", "max_tokens": 120, "ignore_eos": True}
                admitted = [asyncio.ensure_future(h.post("/v1/completions", json=body)) for _ in range(2)]
                deadline = time.monotonic() + 60
                while server.runner.waiting() < 1 or server.engine.num_running < 1:   # one runs, one waits
                    assert time.monotonic() < deadline and not any(a.done() for a in admitted)
                    await asyncio.sleep(0.01)
                t0 = time.perf_counter()
                refused = await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(3)))
                fast = time.perf_counter() - t0
                return await asyncio.gather(*admitted), refused, fast

        admitted, refused, fast = asyncio.run(scenario())
        for r in refused:
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        assert fast < 1.0
        assert [r.status_code for r in admitted] == [200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 120 for r in admitted)


# -- the other routes, the CLI and the API key -----------------------------------------------------------------------
def test_tokenize_detokenize_models_health_metrics(mistral):
    url = mistral[0]
    ids = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["tokens"][0] == 1 and ids["max_model_len"] == 2048
    assert httpx.post(url + "/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == mistral[1].tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert httpx.post(url + "/detokenize", json={"tokens": [99999]}).status_code == 400
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-mistral"
    text = httpx.get(url + "/metrics").text
    for name in ("sirocco_requests_running", "sirocco_requests_waiting", "sirocco_prompt_tokens_total",
                 "sirocco_generation_tokens_total", "sirocco_time_to_first_token_seconds_count",
                 "sirocco_time_per_output_token_seconds_count", "sirocco_e2e_request_latency_seconds_count"):
        metric(text, name)
    # one request alone: a pre-fill step of its prompt, then a step per token after the first, each counted once
    steps0, tokens0 = metric(text, "sirocco_iteration_tokens_count"), metric(text, "sirocco_iteration_tokens_sum")
    busy0 = metric(text, "sirocco_engine_busy_seconds_total")
    r = httpx.post(url + "/v1/completions", json={"prompt": [1, 5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3
    text = httpx.get(url + "/metrics").text
    assert metric(text, "sirocco_iteration_tokens_count") - steps0 == 3
    assert metric(text, "sirocco_iteration_tokens_sum") - tokens0 == 5 + 2
    assert metric(text, "sirocco_engine_busy_seconds_total") > busy0
    assert metric(text, "sirocco_request_success_total", 'finish_reason="length"') > 0


def test_the_model_is_loaded_built_and_run_on_one_thread(ckpts, monkeypatch):
    # PyTorch's CPU threads are an OpenMP team per thread that runs parallel work: a model loaded on one thread
    # and run on another makes two, and the runtime then lets its workers sleep between operations (a decode
    # step 12% slower on 2 cores: serve.runner). So the load, the engine's construction and every step must
    # run on the engine's thread, and none of them on the thread that built the app or the event loop's.
    import threading

    from sirocco.cli import serve as serve_cli
    from sirocco.generate.engine import Engine

    seen: dict[str, set] = {"load": set(), "build": set(), "step": set()}
    load, init, step = serve_cli.load_from_args, Engine.__init__, Engine.step

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen[name].add(threading.get_ident())
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(serve_cli, "load_from_args", spy("load", load))
    monkeypatch.setattr(Engine, "__init__", spy("build", init))
    monkeypatch.setattr(Engine, "step", spy("step", step))
    with serve(ckpts["mistral"], "--max-rows", "2") as (url, server):
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        engine_thread = server.runner.model_thread.thread.ident
    assert seen["load"] == seen["build"] == seen["step"] == {engine_thread}
    assert engine_thread != threading.get_ident()


def test_serve_cli_with_api_key_from_the_environment(ckpts):
    port = free_port()
    env = {**os.environ, "SIROCCO_API_KEY": "s3cret", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "sirocco.cli", "serve", "--model", str(ckpts["mixtral"]),
                             "--port", str(port), "--served-model-name", "moe", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:     # open without a key
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 200
        c = client(url, api_key="s3cret")
        assert c.models.list().data[0].id == "moe"
        r = c.completions.create(model="moe", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="tiny-mixtral", prompt="Hello", max_tokens=3)
        proc.terminate()                    # SIGTERM, as a service manager stops it: a clean exit
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(30)


def test_serve_over_pipeline_ranks_outside_torchrun_says_how_to_start(ckpts, capsys, monkeypatch):
    from sirocco.cli import main
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["serve", "--model", str(ckpts["mistral"]), "--pipeline-ranks", "2"]) == 1
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node" in err and "--pipeline-ranks" in err     # (tests/test_serve_pipeline.py)
