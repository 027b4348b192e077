"""The inside panel's data path without a browser: the engine's per-request observer (only the observed request's
steps, nothing for the others), ``viz.inside.RowTrace`` against the full ``viz.Trace`` of the same run, the
``/v1/inside`` stream and ``/v1/status`` of a real server, the page's files and headers, ``sirocco viz --ids``
and ``sirocco chat --web``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_fixtures import metric, serve, write_checkpoint
from sirocco import backends, viz
from sirocco.cli import main
from sirocco.config import preset
from sirocco.generate.engine import Engine, RowStep
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model
from sirocco.model.transformer import MoeFeedForward
from sirocco.viz import Trace
from sirocco.viz.inside import RowTrace

pytestmark = pytest.mark.usefixtures("one_thread")

STATIC = Path(__file__).parents[1] / "src" / "sirocco" / "serve" / "static"


class Recorded:
    """A RowObserver that keeps each RowStep, its RowTrace event, and the engine's full trace step beside it."""

    def __init__(self, full: Trace | None = None):
        self.rt = RowTrace()
        self.full = full
        self.steps: list[RowStep] = []
        self.events: list[dict] = []
        self.full_steps: list = []

    def on_row_step(self, step: RowStep) -> None:
        self.steps.append(step)
        self.events.append(self.rt.event([step]))
        if self.full is not None:                 # the engine's trace recorded this step just before
            self.full_steps.append(self.full.steps[-1])


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)


# -- the engine: per request, and nothing for the others ---------------------------------------------------------------
def test_untraced_steps_do_no_observing_work_and_traced_ones_see_only_their_row(monkeypatch):
    model = build_model(preset("tiny-moe", sliding_window=4), seed=0)
    engine = Engine(model, None, max_rows=3, chunk_size=3)
    calls = {"tell": 0, "route": 0}
    tell, route = Engine._tell_observers, Engine._observe_routing

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(Engine, "_tell_observers", spy("tell", tell))
    monkeypatch.setattr(Engine, "_observe_routing", spy("route", route))
    seen_routes: list[bool] = []                  # per MoE call: was a routing observer installed?
    original = MoeFeedForward.route

    def watched_route(self, x, router_logits=None):
        seen_routes.append(self.on_route is not None)
        return original(self, x, router_logits)
    monkeypatch.setattr(MoeFeedForward, "route", watched_route)
    # untraced: no observing work at all, and no routing observer installed in any MoE layer
    plain = engine.generate([[5, 6, 7, 8, 9], [1, 2, 3]], greedy(4))
    assert calls == {"tell": 0, "route": 0} and seen_routes and not any(seen_routes)
    # one traced request beside two untraced ones: told of exactly the steps that ran its row
    seen_routes.clear()
    rec = Recorded()
    engine.add_request([5, 6, 7, 8, 9], greedy(4), request_id="a")
    engine.add_request([1, 2, 3, 4, 5, 6, 7], greedy(6), request_id="b", observer=rec)
    engine.add_request([1, 2, 3], greedy(4), request_id="c")
    steps_with_b = 0
    out = {}
    while engine.has_unfinished():
        running = {s.request_id for s in engine.scheduler.running}
        before = calls["tell"]
        for ev in engine.step():
            if ev.completion is not None:
                out[ev.request_id] = ev.completion
        ran_b = "b" in running or any(s.request_id == "b" for s in engine.scheduler.running)
        if calls["tell"] > before:
            steps_with_b += 1
        assert calls["tell"] == before or ran_b
    assert len(rec.steps) == steps_with_b == calls["tell"] == calls["route"]
    assert out["a"].tokens == plain[0].tokens and out["c"].tokens == plain[1].tokens[:4]   # nothing changed
    # the slices: its own tokens, positions and routing rows
    seq = out["b"].prompt_tokens + out["b"].tokens
    fed = [t for st in rec.steps for t in st.tokens]
    assert fed == seq[:-1]
    assert [st.start for st in rec.steps] == [sum(len(s.tokens) for s in rec.steps[:i]) for i in range(len(rec.steps))]
    for st in rec.steps:
        assert st.plan.lengths[st.index] == len(st.tokens) and st.plan.starts[st.index] == st.start
        assert sorted(st.routing) == [0, 1] and all(c.shape == (len(st.tokens), 2) for c, _ in st.routing.values())
        assert st.prefill_tokens + st.decode_tokens == sum(st.plan.lengths) and st.rows == len(st.plan.lengths)
        assert st.seconds > 0
    # after the observed request, untraced steps are free again
    calls.update(tell=0, route=0)
    engine.generate([[4, 4, 4]], greedy(3))
    assert calls == {"tell": 0, "route": 0}


@pytest.mark.parametrize("attention", ["per_sequence", "dense"])
def test_row_trace_is_the_full_trace_restricted_to_the_row(attention):
    # Three requests of different lengths, chunks of 3 over a window of 4, mixed steps: the observed request
    # shares steps with others, its row moves when an earlier one finishes, the cache wraps.
    model = build_model(preset("tiny-moe", sliding_window=4), seed=2)
    full = Trace()
    backends.attach(model, "torch", prefill=attention)
    engine = Engine(model, None, max_rows=3, chunk_size=3, max_batch_tokens=5, trace=full)
    rec = Recorded(full)
    engine.add_request([3, 1, 4, 1], greedy(2))
    engine.add_request([2, 7, 1, 8, 2, 8, 1], greedy(7), observer=rec)
    engine.add_request([5, 9, 2], greedy(3))
    while engine.has_unfinished():
        engine.step()
    assert len({st.row for st in rec.steps}) > 1, "the row was meant to move"
    window = full.window
    for st, ev, whole in zip(rec.steps, rec.events, rec.full_steps):
        assert ev["slots"] == whole.slots[window][st.row]
        assert ev["written"] == [s for r, s in whole.written[window] if r == st.row]
        # the full trace's queries of this request and the key columns of its sequence (the full trace names
        # sequences by their Completion.index: 1 for the second request added)
        m = whole.masks[window]
        rows = [i for i, (s, _) in enumerate(m.queries) if s == 1]
        cols = [j for j, k in enumerate(m.keys) if k[0] == 1]
        assert ev["mask"]["queries"] == [m.queries[i][1] for i in rows]
        assert ev["mask"]["keys"] == [[m.keys[j][1], m.keys[j][2]] for j in cols]
        dense = [[0] * len(cols) for _ in rows]
        for qi, runs in enumerate(ev["mask"]["runs"]):
            for a, n in runs:
                for j in range(a, a + n):
                    dense[qi][j] = 1
        assert dense == [[m.allowed[i][j] for j in cols] for i in rows]
        # routing: the rows of the request's tokens in the step's packing
        a = sum(whole.lengths[:st.index])
        moe = ev["steps"][0]["moe"]
        assert moe["layers"] == [0, 1] and len(moe["experts"]) == len(st.tokens)
        for li, layer in enumerate(moe["layers"]):
            assert [e[li] for e in moe["experts"]] == whole.router[layer][0][a:a + len(st.tokens)]
    # the slot map after the last step is the one `sirocco viz cache` records for the same tokens alone
    seq = [t for s in rec.steps for t in s.tokens]
    data, _ = viz.cache([seq], window=window, max_tokens=1, model=model)
    assert rec.events[-1]["slots"] == data["steps"][-1]["rows"][0]
    # the same steps in batches (as the server sends them): each step's facts, and the row as the last one left it
    batched, per_step = RowTrace(), RowTrace()
    one = [per_step.event([st]) for st in rec.steps]
    cuts = [0, 1, 4, 5, len(rec.steps)]
    for a, b in zip(cuts, cuts[1:]):
        ev = batched.event(rec.steps[a:b])
        assert ev["steps"] == [e["steps"][0] for e in one[a:b]]
        assert {k: ev[k] for k in ("window", "slots", "written", "mask")} == \
               {k: one[b - 1][k] for k in ("window", "slots", "written", "mask")}


def test_a_row_continued_from_the_prefix_store_is_traced_from_its_restored_positions():
    """A request whose prompt starts with a stored one starts at m: its first RowStep carries the m restored
    tokens, its RowTrace (and the engine's full trace) start from the slot map a pre-fill of them leaves, and after
    its last step the map is the one `sirocco viz cache` records for its tokens pre-filled cold. Window 4, chunks
    of 3: the stored ring has wrapped."""
    model = build_model(preset("tiny-moe", sliding_window=4), seed=2)
    full = Trace()
    engine = Engine(model, None, max_rows=2, chunk_size=3, trace=full, prefix_cache_bytes=2**22)
    stored = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]
    engine.generate([stored], greedy(2))
    rec = Recorded(full)
    prompt = stored + [8, 4, 6]
    engine.add_request(prompt, greedy(6), observer=rec)
    engine.add_request([2, 7, 1, 8], greedy(3))                  # beside it
    done = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.completion is not None:
                done[ev.completion.index] = ev.completion
    [warm] = [c for c in done.values() if c.prompt_tokens == prompt]
    m = warm.cached_tokens
    assert m == len(stored)
    first, *rest = rec.steps
    assert first.start == m and list(first.restored) == stored and all(not st.restored for st in rest)
    window = full.window
    size = len(rec.events[0]["slots"])
    assert size == 4
    # the map before the first step's writes: the last S restored positions, each in slot p % S
    ev = rec.events[0]
    step = ev["steps"][0]
    assert step["cached_tokens"] == m and "cached_tokens" not in rec.events[1]["steps"][0]
    assert [p for p, _, _ in step["restored"]] == [p for p in sorted(ev["slots"]) if p < m]
    assert all(stored[p] == t for p, t, _ in step["restored"])
    for st, e, whole in zip(rec.steps, rec.events, rec.full_steps):
        assert e["slots"] == whole.slots[window][st.row]                  # the engine's full trace agrees
        assert None not in e["slots"]
    seq = prompt + warm.tokens[:-1]
    data, _ = viz.cache([seq], window=window, max_tokens=1, model=model)
    assert rec.events[-1]["slots"] == data["steps"][-1]["rows"][0]


# -- the server: /v1/inside, /v1/status, the page's files --------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mistral", tmp_path_factory.mktemp("inside") / "tiny-mistral")


@pytest.fixture(scope="module")
def server(ckpt):
    with serve(ckpt, "--max-rows", "2", "--api-key", "k3y") as started:
        yield started


AUTH = {"Authorization": "Bearer k3y"}


def read_inside(url: str, channel: str, stop_after_end: int, opened: threading.Event, out: list,
                headers: dict = AUTH) -> None:
    """Read the inside stream of ``channel`` into ``out`` until ``stop_after_end`` end events have come (or the
    server ends the stream)."""
    with httpx.stream("GET", f"{url}/v1/inside/{channel}", headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ends = 0
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[len("data: "):])))
                if kind == "open":
                    opened.set()
                if kind == "end":
                    ends += 1
                    if ends == stop_after_end:
                        return


def test_inside_stream_follows_one_request_and_the_chat_stream_stays_openai_s(server):
    url, srv = server
    events: list = []
    opened = threading.Event()
    reader = threading.Thread(target=read_inside, args=(url, "test-channel-1", 1, opened, events), daemon=True)
    reader.start()
    assert opened.wait(30)
    messages = [{"role": "user", "content": "Tell me about the sliding window of the cache"}]
    body = {"messages": messages, "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True,
            "sirocco_inside": "test-channel-1"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        raw = r.read().decode()
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"     # nothing else in it
    text = "".join(json.loads(b[6:])["choices"][0]["delta"].get("content", "") for b in blocks[:-1])
    # beside it, an untraced request: not on the channel
    plain = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json={**body, "stream": False,
                                                                                     "sirocco_inside": None})
    assert plain.json()["choices"][0]["message"]["content"] == text
    reader.join(30)
    kinds = [k for k, _ in events]
    assert kinds[0] == "open" and kinds[1] == "start" and kinds[-1] == "end" and set(kinds[2:-1]) == {"steps"}
    batches = [d for k, d in events if k == "steps"]
    start, steps, end = events[1][1], [s for b in batches for s in b["steps"]], events[-1][1]
    assert start["prompt_tokens"] == len(srv.tokenizer.encode_chat(messages)) and start["windows"] == [16]
    assert end == {"id": start["id"], "finish_reason": "length"} and all(b["id"] == start["id"] for b in batches)
    # every position of the prompt and the answer but the last went through, with its token and text
    prompt = srv.tokenizer.encode_chat(messages)
    fed = [(p, t) for s in steps for p, t, _ in s["tokens"]]
    assert [p for p, _ in fed] == list(range(len(prompt) + 39))
    assert [t for _, t in fed][:len(prompt)] == prompt
    answer = [t for _, t in fed][len(prompt):]
    assert srv.tokenizer.decode(answer) == text[:len(srv.tokenizer.decode(answer))]
    last = batches[-1]
    length = len(prompt) + 39
    assert last["window"] == 16 and last["slots"] == [max(p for p in range(length) if p % 16 == s) for s in range(16)]
    assert steps[-1]["kind"] == "decode" and last["mask"]["runs"] == [[[0, 16]]]
    assert [s["step"] for s in steps] == list(range(len(steps)))
    assert all(s["ms"] > 0 and s["rows"] >= 1 and "moe" not in s for s in steps)


def test_inside_refusals_and_the_key(server):
    url, _ = server
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert httpx.get(url + "/v1/inside/abcdefgh").status_code == 401
    assert httpx.get(url + "/v1/status").status_code == 401
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**chat, "sirocco_inside": "not-open-channel"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sirocco_inside"
    assert httpx.get(url + "/v1/inside/bad!name", headers=AUTH).status_code in (400, 404)
    assert httpx.get(url + "/v1/inside/short", headers=AUTH).status_code == 400
    events: list = []
    opened = threading.Event()
    threading.Thread(target=read_inside, args=(url, "test-channel-2", 1, opened, events), daemon=True).start()
    assert opened.wait(30)
    assert httpx.get(url + "/v1/inside/test-channel-2", headers=AUTH, timeout=5).status_code == 409
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                   json={**chat, "n": 2, "sirocco_inside": "test-channel-2"})
    assert r.status_code == 400 and "one sequence" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**chat, "sirocco_inside": "test-channel-2"})
    assert r.status_code == 200


def test_status_has_the_numbers_of_metrics(server):
    url, _ = server
    httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "a", "max_tokens": 3}, timeout=60)
    status = httpx.get(url + "/v1/status", headers=AUTH).json()
    text = httpx.get(url + "/metrics").text
    assert status["running"] == metric(text, "sirocco_requests_running")
    assert status["waiting"] == metric(text, "sirocco_requests_waiting")
    assert status["generation_tokens"] == metric(text, "sirocco_generation_tokens_total") >= 3
    assert status["ttft"]["count"] == metric(text, "sirocco_time_to_first_token_seconds_count") >= 1
    assert status["ttft"]["sum"] == metric(text, "sirocco_time_to_first_token_seconds_sum")
    assert status["finished"]["abort"] == metric(text, "sirocco_request_success_total", 'finish_reason="abort"')


def test_the_page_s_files_headers_and_what_they_may_do(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    # no inline script, no style or event-handler attributes, every script and style from this origin
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/static/js/main.js">']
    assert not re.search(r"\sstyle\s*=|\son[a-z]+\s*=|<style", html, flags=re.I)
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        r = httpx.get(url + ref)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", ref
    for f in sorted(STATIC.rglob("*.js")):
        code = f.read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function",
                             code), f
        for imp in re.findall(r'from "\./([\w.]+)"', code):
            assert httpx.get(f"{url}/static/js/{imp}").status_code == 200, imp
        assert httpx.get(f"{url}/static/{f.relative_to(STATIC).as_posix()}").headers["content-type"].startswith(
            "text/javascript")
    for f in STATIC.rglob("*"):                    # nothing names another host (an SVG's xmlns is not a request)
        if f.is_file():
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", f.read_text()), f
    for bad in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nothing.js", "/static/"):
        assert httpx.get(url + bad).status_code == 404, bad


# -- the CLI: viz --ids, chat --web ------------------------------------------------------------------------------------
def test_viz_cache_of_given_token_ids(capsys):
    from sirocco.pretrained import load

    ids = [1, 624, 1467, 1351, 4066, 755, 4012] * 11                # 77 tokens: past sirocco-tiny's window
    assert main(["-q", "viz", "cache", "--model", "sirocco-tiny", "--ids", ",".join(map(str, ids)),
                 "--max-tokens", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["window"] == data["slots"] == 64
    assert data["steps"][-1]["rows"][0] == [max(p for p in range(77) if p % 64 == s) for s in range(64)]
    want, _ = viz.cache([ids], window=64, max_tokens=1, model=load("sirocco-tiny").model)
    assert data == json.loads(json.dumps(want))
    with pytest.raises(SystemExit, match="--ids"):
        main(["-q", "viz", "cache", "--ids", "1,2,3"])
    with pytest.raises(SystemExit, match="vocabulary"):
        main(["-q", "viz", "cache", "--model", "sirocco-tiny", "--ids", "1,99999"])


@pytest.mark.slow
def test_chat_web_serves_the_page_on_loopback_until_interrupted():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "sirocco.cli", "chat", "--web", "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        deadline = time.monotonic() + 90
        while address is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "chat --web exited"
            found = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser", line)
            address = found.group(1) if found else None
            assert time.monotonic() < deadline
        page = httpx.get(address, timeout=10)
        assert page.status_code == 200 and "inside" in page.text
        r = httpx.post(address + "v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 3
        # a page's inside stream never ends on its own: Ctrl-C ends it, and the server stops at once
        events: list = []
        opened = threading.Event()
        reader = threading.Thread(target=read_inside, args=(address.rstrip("/"), "chat-web-test", 1, opened, events),
                                  kwargs={"headers": {}}, daemon=True)
        reader.start()
        assert opened.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0                                   # a stop asked for is a clean exit
        assert time.monotonic() - t0 < 10
        reader.join(10)
        assert not reader.is_alive()
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
