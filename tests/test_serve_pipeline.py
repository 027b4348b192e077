"""``sirocco serve --pipeline-ranks 2`` under a real torchrun (gloo, CPU, one thread per rank) on 127.0.0.1: rank 0
serves HTTP, rank 1 runs the second stage. What it answers must be what one process answers: ``sirocco generate
--json`` for tokens and logprobs, the one-process server for top logprobs, the pipeline server itself alone for
concurrent streams. Tiny random fp32 Mistral and Mixtral checkpoints with a real sentencepiece tokenizer.

Two launches in all (each costs seconds): the Mistral server, shared by the tests of this file and stopped by
the last one, and the Mixtral one, started and stopped in its own test. ``--dist-timeout 5``: a rank that waits
longer than that for another fails, so an idle server lives only on rank 0's heartbeat.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import openai
import pytest

from serve_fixtures import (
    PipelineServer,
    alive,
    assert_solo_under_load,
    check_chat_reuse,
    failing_server_rank,
    generate_json,
    metric,
    mixed_jobs,
    serve,
    serve_rank,
    write_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The sliding window", "Hello", "A rolling buffer cache keeps the last W keys and values of every "
           "layer, so memory stays bounded while the sequence grows past the window."]
QUESTION = "What is a sliding window?"
TIMEOUT_S = 5
PIPELINE = ("--max-rows", "4", "--dist-timeout", str(TIMEOUT_S))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-pipeline")
    return {kind: write_checkpoint(kind, root / f"tiny-{kind}") for kind in ("mistral", "mixtral")}


@pytest.fixture(scope="module")
def pipeline(ckpts, tmp_path_factory):
    """The Mistral server over 2 ranks; the last test stops it (and checks how), or this fixture does."""
    server = PipelineServer(ckpts["mistral"], tmp_path_factory.mktemp("logs") / "mistral.log", *PIPELINE)
    try:
        yield server
    finally:
        server.stop("torchrun")


@pytest.fixture(scope="module")
def single(ckpts):
    """The same checkpoint in one process, in this one."""
    with serve(ckpts["mistral"], "--max-rows", "4") as (url, _):
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_equals_generate(url: str, model_dir, name: str) -> None:
    """Greedy completions (batched and streamed) and a chat through ``url`` equal ``sirocco generate --json``."""
    want = generate_json(model_dir, PROMPTS, "--max-tokens", "12")
    c = client(url)
    assert c.models.list().data[0].id == name
    r = c.completions.create(model=name, prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=1)
    for ch, w in zip(r.choices, want):
        assert ch.text == w["text"] and ch.finish_reason == w["finish_reason"]
        assert len(ch.logprobs.token_logprobs) == len(w["tokens"])
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(ch.logprobs.token_logprobs, w["logprobs"]))
    assert r.usage.completion_tokens == sum(len(w["tokens"]) for w in want)
    assert r.usage.prompt_tokens == sum(len(w["prompt_tokens"]) for w in want)
    for p, w in zip(PROMPTS, want):
        s = c.completions.create(model=name, prompt=p, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in s) == w["text"]
    chat = generate_json(model_dir, [QUESTION], "--chat", "--max-tokens", "10")[0]
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=10,
                                  temperature=0, logprobs=True)
    assert r.choices[0].message.content == chat["text"]
    assert r.usage.completion_tokens == len(chat["tokens"]) and r.usage.prompt_tokens == len(chat["prompt_tokens"])
    assert all(math.isclose(e.logprob, lp, abs_tol=1e-5) for e, lp in zip(r.choices[0].logprobs.content,
                                                                        chat["logprobs"]))


def check_clean_stop(server: PipelineServer, how: str) -> int | None:
    code = server.stop(how)
    log = server.log()
    assert "rank 1: stopped by rank 0" in log and "rank 0: stopped" in log, log[-4000:]
    for trouble in ("lost the other ranks", "engine loop failed", "aborting the process group"):
        assert trouble not in log, log[-4000:]
    assert not any(alive(pid) for pid in server.pids.values())
    return code


# -- the same answers as one process -------------------------------------------------------------------------------
def test_greedy_completions_and_chat_equal_generate_json(pipeline, ckpts):
    check_equals_generate(pipeline.url, ckpts["mistral"], "tiny-mistral")
    assert "over 2 pipeline ranks" in pipeline.log()


def test_mixtral_over_two_ranks_equals_generate_json_and_stops_from_rank_0(ckpts, tmp_path):
    server = PipelineServer(ckpts["mixtral"], tmp_path / "mixtral.log", "--max-rows", "2", "--dist-timeout", "30")
    try:
        check_equals_generate(server.url, ckpts["mixtral"], "tiny-mixtral")
    finally:
        code = check_clean_stop(server, "rank0")
    assert code == 0                    # torchrun's status: every rank exited with 0


def test_top_logprobs_equal_the_one_process_server(pipeline, single):
    def ask(url):
        c = client(url)
        r = c.completions.create(model="tiny-mistral", prompt=PROMPTS[:2], max_tokens=6, temperature=0, logprobs=4)
        chat = c.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
        return ([top for ch in r.choices for top in ch.logprobs.top_logprobs],
                [[(t.token, t.logprob) for t in e.top_logprobs] for e in chat.choices[0].logprobs.content])

    async def together(url):            # rows wanting different k, and one wanting none, in the same steps
        async with httpx.AsyncClient(base_url=url, timeout=120) as h:
            bodies = [{"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": k} for k in (1, 5, None)]
            rs = await asyncio.gather(*(h.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["logprobs"] for r in rs]

    (completion, chat), (completion_1, chat_1) = ask(pipeline.url), ask(single)
    assert len(completion) == len(completion_1) == 12              # 2 choices x 6 tokens, 4 alternatives each
    for g, w in zip(completion, completion_1):
        assert len(g) == 4 and list(g) == list(w)                  # the same tokens, in the same order
        assert all(math.isclose(g[t], w[t], abs_tol=1e-5) for t in g)
    assert len(chat) == len(chat_1) == 5
    for g, w in zip(chat, chat_1):
        assert len(g) == 2 and [t for t, _ in g] == [t for t, _ in w]
        assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), (_, b) in zip(g, w))
    got, want = asyncio.run(together(pipeline.url)), asyncio.run(together(single))
    assert got[2] is None and want[2] is None
    for g, w, k in zip(got[:2], want[:2], (1, 5)):
        assert g["tokens"] == w["tokens"]
        assert all(len(top) == k for top in g["top_logprobs"])
        for gt, wt in zip(g["top_logprobs"], w["top_logprobs"]):
            assert list(gt) == list(wt) and all(math.isclose(gt[t], wt[t], abs_tol=1e-5) for t in gt)


# -- concurrency, aborts, idling ----------------------------------------------------------------------------------
def test_a_chat_turn_continues_from_the_last_ones_state_on_every_rank(pipeline, ckpts):
    """Each rank restores its own layers' keys and values: the answer is the cold one of one process."""
    check_chat_reuse(pipeline.url, ckpts["mistral"], "tiny-mistral")


def test_concurrent_streams_get_their_solo_output(pipeline):
    # 8 streams over 4 rows: some wait for a row
    assert_solo_under_load(pipeline.url, mixed_jobs(7, span=17, seeded_tokens=12))


def test_a_client_that_disconnects_frees_its_row_on_every_rank(pipeline):
    """Every row taken, then every client gone: rank 0's metrics say the rows are free, and new requests that
    need all the rows get their solo output. Had rank 1 kept a row, the two ranks' steps would differ and the
    first of them would fail."""
    url = pipeline.url
    aborted0 = metric(httpx.get(url + "/metrics").text, "sirocco_request_success_total", 'finish_reason="abort"')
    body = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True}

    async def hang_up():
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            async def stream():
                async with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    async for i, _ in _enumerate(r.aiter_lines()):
                        if i > 6:
                            return

            async def give_up():
                with pytest.raises(httpx.ReadTimeout):
                    await h.post("/v1/completions", json=body, timeout=1.5)

            await asyncio.gather(stream(), stream(), stream(), give_up())

    asyncio.run(hang_up())
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "sirocco_request_success_total", 'finish_reason="abort"') == aborted0 + 4:
            break
        assert time.monotonic() < deadline, "the disconnected requests were not aborted"
        time.sleep(0.05)
    assert metric(text, "sirocco_requests_running") == 0 and metric(text, "sirocco_requests_waiting") == 0
    c = client(url)
    prompts = ["One", "Two two", "Three three three", "Four"]
    solo = [c.completions.create(model="tiny-mistral", prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in prompts]
    r = c.completions.create(model="tiny-mistral", prompt=prompts, max_tokens=8, temperature=0)   # all 4 rows
    assert [ch.text for ch in r.choices] == solo
    assert httpx.get(url + "/health").json() == {"status": "ok"}


async def _enumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


def test_an_idle_server_outlives_the_timeout(pipeline):
    c = client(pipeline.url)
    before = c.completions.create(model="tiny-mistral", prompt="Idle", max_tokens=5, temperature=0).choices[0].text
    time.sleep(TIMEOUT_S + 1.5)                      # no request for longer than a rank may wait for another
    after = c.completions.create(model="tiny-mistral", prompt="Idle", max_tokens=5, temperature=0).choices[0].text
    assert after == before
    assert "lost the other ranks" not in pipeline.log()


# -- stopping (last: it ends the shared server) ------------------------------------------------------------------------
def test_the_server_stops_cleanly_and_leaves_no_process(pipeline):
    assert httpx.get(pipeline.url + "/health").status_code == 200
    check_clean_stop(pipeline, "torchrun")        # torchrun passes SIGTERM on to every rank; it exits non-zero itself
    with pytest.raises(httpx.TransportError):
        httpx.get(pipeline.url + "/health", timeout=2)


# -- refusals ----------------------------------------------------------------------------------------------------------
def test_a_gguf_file_over_pipeline_ranks_is_refused_clearly(tmp_path):
    from sirocco.distributed.launch import spawn_local
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    results = spawn_local(serve_rank, 2, (["--pipeline-ranks", "2", "--model", str(gguf), "--port", "0"],),
                          timeout_s=60, deadline_s=60)
    assert results[0].error_type == "SiroccoError" and "a GGUF file runs in one process" in results[0].error
    assert results[1].ok and results[1].value == 1           # the others exit with an error code, quietly


# -- failing together ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_a_rank_that_fails_while_serving_fails_the_others_within_seconds(bad_rank):
    from sirocco.distributed.launch import spawn_local
    t0 = time.time()
    results = spawn_local(failing_server_rank, 2, (bad_rank,), timeout_s=120, deadline_s=60, grace_s=30)
    bad, good = results[bad_rank], results[1 - bad_rank]
    assert bad.error_type == "RuntimeError" and "injected failure" in bad.error, bad.error
    assert good.error_type == "DistributedError" and "lost the other ranks" in good.error, good.error
    assert good.finished_at - bad.finished_at < 5.0                # seconds, far below the 120 s timeout
    assert time.time() - t0 < 45
