"""The chat page in a real headless browser (Debian's chromium under Playwright) against real servers on the
bundled models: it loads with no console error and asks nothing of another host, streams, stops (the server
counts the abort), keeps the conversation over a reload, regenerates and edits, asks for the API key, shows the
engine's slot map as ``sirocco viz cache`` records it, two experts per token per layer for the MoE model, model
text containing ``<script>`` as text, and stays responsive through a 4,000-token conversation."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time

import httpx
import pytest

from serve_fixtures import generate_json, metric, serve
from sirocco.cli import main
from web_fixtures import (
    REQUIRED,
    browser,
    inside_request,
    missing,
    open_page,
    seed_conversation,
    send,
    settings,
    slot_map,
    wait_answer,
    wait_inside_done,
    watch_text_lengths,
    write_parrot_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

QUESTION = "What does the with statement do?"


@pytest.fixture(scope="module")
def chrome():
    why = missing()
    if why is not None:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    with browser() as b:
        yield b


@pytest.fixture(scope="module")
def tiny():
    with serve("sirocco-tiny", "--max-rows", "4", "--threads", "1") as started:
        yield started


def test_page_loads_streams_stops_and_keeps_the_conversation(chrome, tiny):
    url, server = tiny
    with open_page(chrome, url + "/") as p:
        pg = p.page
        settings(pg, temperature=0, max_tokens=200)
        watch_text_lengths(pg)
        send(pg, QUESTION)
        answer = wait_answer(pg)
        want = generate_json("sirocco-tiny", [QUESTION], "--chat", "--max-tokens", "200")[0]
        shown = want["text"].lstrip("\n")            # (the page leaves out the blank lines an answer starts with)
        assert answer["text"] == shown
        lengths = pg.evaluate("window.__lengths")
        assert len({n for n in lengths if 0 < n < len(shown)}) >= 3, lengths            # it came in pieces
        assert lengths == sorted(lengths)
        assert "200 tokens" in answer["stats"] and "tokens/s" in answer["stats"] and "first after" in answer["stats"]
        # a reload keeps it
        pg.reload()
        pg.wait_for_selector("#messages article.assistant")
        assert wait_answer(pg)["text"] == shown
        assert pg.locator("#messages article").count() == 2
        # stop: the stream ends, the server aborts the request and counts it
        aborted = metric(httpx.get(url + "/metrics").text, "sirocco_request_success_total", 'finish_reason="abort"')
        settings(pg, max_tokens=1500)
        send(pg, "Tell me everything about the with statement.")
        pg.wait_for_function("() => { const a = [...document.querySelectorAll('article.assistant .body')].pop();"
                             " return document.body.classList.contains('busy') && a && a.textContent.length > 20 }")
        pg.click("#stop")
        stopped = wait_answer(pg)
        assert "stopped" in stopped["stats"] and pg.locator("#messages article.stopped").count() == 1
        deadline = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, "sirocco_request_success_total",
                     'finish_reason="abort"') != aborted + 1:
            assert time.monotonic() < deadline, "the server did not count the abort"
            time.sleep(0.05)
        assert server.engine.num_running == 0 and not pg.is_disabled("#send")
        # nothing went wrong, and nothing left this host
        assert p.console_errors() == [] and p.foreign() == []
        assert {u.split("?")[0] for _, u in p.requests} >= {url + "/", url + "/static/js/main.js", url + "/v1/models"}


def test_regenerate_edit_system_prompt_and_code_blocks(chrome, tiny):
    url, _ = tiny
    with open_page(chrome, url + "/") as p:
        pg = p.page
        bodies = []
        pg.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(json.loads(r.post_data)))
        settings(pg, temperature=0, max_tokens=12)
        pg.fill("#system", "You answer briefly.")
        pg.dispatch_event("#system", "change")
        send(pg, "Hello")
        first = wait_answer(pg)["text"]
        assert bodies[-1]["messages"] == [{"role": "system", "content": "You answer briefly."},
                                          {"role": "user", "content": "Hello"}]
        assert bodies[-1]["temperature"] == 0 and bodies[-1]["max_tokens"] == 12 and bodies[-1]["stream"] is True
        pg.click("article.assistant button.regenerate")
        assert wait_answer(pg)["text"] == first and pg.locator("#messages article").count() == 2
        assert bodies[-1]["messages"] == bodies[-2]["messages"]
        # edit the question and send it again: the conversation continues from the edited message
        pg.click("article.user button.edit")
        pg.fill("article.user textarea", "Goodbye")
        pg.click("article.user button.resend")
        wait_answer(pg)
        assert bodies[-1]["messages"][1:] == [{"role": "user", "content": "Goodbye"}]
        assert pg.locator("#messages article").count() == 2
        assert pg.locator("article.user .body").text_content() == "Goodbye"
        # fenced code becomes a code block, and markup inside it stays text
        html = pg.evaluate("""async () => {
            const { renderText } = await import('/static/js/render.js');
            const div = document.createElement('div');
            renderText(div, 'Use it:\\n```python\\nwith open(f) as g:\\n    print("<b>x</b>")\\n```\\nand `x<y`.');
            return {pre: div.querySelectorAll('pre.code code').length,
                    code: div.querySelector('pre.code code').textContent,
                    lang: div.querySelector('.code-head span').textContent,
                    inline: [...div.querySelectorAll('.text code')].map(c => c.textContent),
                    bold: div.querySelectorAll('b').length};
        }""")
        assert html == {"pre": 1, "code": 'with open(f) as g:\n    print("<b>x</b>")', "lang": "python",
                        "inline": ["x<y"], "bold": 0}
        assert p.console_errors() == [] and p.foreign() == []


def viz_cache_rows(held: list[int]) -> dict:
    """``sirocco viz cache --json`` of sirocco-tiny over these token ids (one generated token: the cache holds them)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "viz", "cache", "--model", "sirocco-tiny", "--ids", ",".join(map(str, held)),
                     "--max-tokens", "1", "--json"]) == 0
    return json.loads(out.getvalue())


def test_inside_slot_map_equals_viz_cache_for_the_same_tokens(chrome, tiny):
    url, _ = tiny
    with open_page(chrome, url + "/") as p:
        pg = p.page
        settings(pg, temperature=0, max_tokens=80)
        # two questions of the same length one after the other: the second's cells hold the same positions, and
        # must show its own tokens
        for question in (QUESTION, "What does the for statement do?"):
            before = inside_request(pg)
            pg.click("#new-chat")
            send(pg, question)
            wait_answer(pg)
            wait_inside_done(pg, after=before)
            page_slots = slot_map(pg)
            want = generate_json("sirocco-tiny", [question], "--chat", "--max-tokens", "80")[0]
            held = (want["prompt_tokens"] + want["tokens"])[:-1]   # the last token sampled never went through
            assert len(held) > 64                                  # past sirocco-tiny's window: it has wrapped
            recorded = viz_cache_rows(held)
            assert recorded["window"] == 64 and recorded["slots"] == 64
            assert [c["slot"] for c in page_slots] == list(range(64))
            assert [c["pos"] for c in page_slots] == recorded["steps"][-1]["rows"][0]
            assert [c["token"] for c in page_slots] == [held[c["pos"]] for c in page_slots]
            assert pg.locator("#slots .slot.written").count() == 1
            assert "wrapped" in pg.text_content("#cache-caption")
            mask = pg.eval_on_selector("#mask", "c => [Number(c.dataset.queries), Number(c.dataset.keys)]")
            assert mask == [1, 64]                             # the last step: one decode query over the 64 slots
        assert p.console_errors() == [] and p.foreign() == []


def test_a_regenerated_answer_shows_the_prompt_it_took_from_the_prefix_store(chrome, tiny):
    """Regenerate sends the same prompt again: the server restores all of it but its last token, and the panel's
    slot map shows those positions with their tokens (no step brought them) and says how many it reused."""
    url, _ = tiny
    question = "Explain in a few words why a rolling buffer keeps only the last keys and values of a window."
    with open_page(chrome, url + "/") as p:
        pg = p.page
        settings(pg, temperature=0, max_tokens=8)
        pg.click("#new-chat")
        send(pg, question)
        first = wait_answer(pg)["text"]
        wait_inside_done(pg)
        before = inside_request(pg)
        pg.click("article.assistant button.regenerate")
        wait_inside_done(pg, after=before)
        assert wait_answer(pg)["text"] == first
        want = generate_json("sirocco-tiny", [question], "--chat", "--max-tokens", "8")[0]
        held = (want["prompt_tokens"] + want["tokens"])[:-1]
        assert 16 < len(want["prompt_tokens"]) and len(held) <= 64              # stored, and not wrapped
        reused = len(want["prompt_tokens"]) - 1
        assert f"({reused} from the prefix store)" in pg.text_content("#inside-note")
        cells = [c for c in slot_map(pg) if c["pos"] is not None]
        assert [c["pos"] for c in cells] == list(range(len(held)))
        assert [c["token"] for c in cells] == held
        assert p.console_errors() == [] and p.foreign() == []


def test_moe_panel_shows_two_experts_per_token_per_layer(chrome):
    with serve("sirocco-tiny-moe", "--max-rows", "2", "--threads", "1") as (url, server):
        with open_page(chrome, url + "/") as p:
            pg = p.page
            settings(pg, temperature=0, max_tokens=24)
            send(pg, "The with statement")
            n = int(re.match(r"(\d+) tokens", wait_answer(pg)["stats"]).group(1))
            wait_inside_done(pg)
            cells = pg.eval_on_selector_all(
                ".moe-row[data-pos]", "rows => rows.map(r => [...r.querySelectorAll('.moe-cell[data-experts]')]"
                                      ".map(c => c.dataset.experts.split(',').map(Number)))")
            prompt = len(server.tokenizer.encode_chat([{"role": "user", "content": "The with statement"}]))
            assert 10 < n <= 24 and len(cells) == n - 1        # every answer token that went through the model
            for row in cells:
                assert len(row) == 4                           # the model's 4 layers
                assert all(len(set(c)) == 2 and all(0 <= e < 4 for e in c) for c in row)   # two of the 4 experts
            loads = pg.eval_on_selector_all(".load-bar",
                                            "bars => bars.map(b => b.dataset.counts.split(',').map(Number))")
            assert len(loads) == 4 and all(sum(c) == 2 * (prompt + n - 1) for c in loads)
            assert not pg.is_hidden("#moe-panel")
            assert p.console_errors() == [] and p.foreign() == []


def test_a_model_answer_with_a_script_tag_is_shown_as_text(chrome, tmp_path):
    payload = "<script>window.pwned=1</script>"
    ckpt = write_parrot_checkpoint(tmp_path / "parrot", payload)
    with serve(ckpt, "--max-rows", "2", "--threads", "1") as (url, _):
        with open_page(chrome, url + "/") as p:
            pg = p.page
            settings(pg, temperature=0, max_tokens=15)
            send(pg, "Say something")
            answer = wait_answer(pg)
            wait_inside_done(pg)
            assert answer["text"].strip() == payload
            assert pg.evaluate("window.pwned") is None
            assert pg.locator("#messages script, #inside script").count() == 0
            body = pg.eval_on_selector("article.assistant .body",
                                       "b => [...b.querySelectorAll('*')].map(e => e.tagName)")
            assert body == ["DIV"]                            # one text block, no element made from the model's text
            assert "<" in "".join(c["text"] for c in slot_map(pg))
            assert p.console_errors() == [] and p.foreign() == []


def test_the_page_asks_for_the_api_key_and_nothing_works_without_it(chrome):
    with serve("sirocco-tiny", "--max-rows", "2", "--threads", "1", "--api-key", "open-sesame") as (url, _):
        with open_page(chrome, url + "/", wait_model=False) as p:
            pg = p.page
            pg.wait_for_selector("#key-dialog[open]")
            assert "401" in pg.text_content("#notice") and "API key" in pg.text_content("#notice")
            data = [(s, u) for s, u in p.responses if "/v1/" in u]
            assert data and all(s == 401 for s, _ in data)
            # without the key, sending fails with 401 and says so
            pg.keyboard.press("Escape")
            settings(pg, temperature=0, max_tokens=8)
            send(pg, "Hello")
            failed = wait_answer(pg)
            assert pg.locator("article.assistant .error").text_content().startswith("The server needs an API key (401)")
            assert failed["text"] == "" and pg.is_visible("#key-dialog")
            # with it, everything works: the model, the answer, the inside panel, the status line
            pg.fill("#key-input", "wrong")
            pg.click("#key-form button[type=submit]")
            pg.wait_for_selector("#key-dialog[open]")
            assert "refused" in pg.text_content("#key-why")
            pg.fill("#key-input", "open-sesame")
            pg.click("#key-form button[type=submit]")
            pg.wait_for_selector("#model-name:not(:empty)")
            pg.click("article.assistant button.regenerate")
            answer = wait_answer(pg)
            assert answer["text"] and "8 tokens" in answer["stats"]
            wait_inside_done(pg)
            pg.wait_for_function("() => document.getElementById('status').textContent.includes('running')")
            later = [(s, u) for s, u in p.responses[len(data):] if "/v1/" in u]
            assert any(s == 200 and u.endswith("/v1/chat/completions") for s, u in later)
            assert any(s == 200 and "/v1/inside/" in u for s, u in later)
            assert p.foreign() == []


def test_the_page_stays_responsive_through_a_4000_token_conversation(chrome, tiny):
    url, server = tiny
    with open_page(chrome, url + "/", width=1400, height=900) as p:
        pg = p.page
        paragraph = ("The with statement is used to wrap the execution of a block with methods defined by a context "
                     "manager. This allows common try, except and finally usage patterns to be encapsulated. ")
        history: list[dict] = []
        while True:
            turn = [{"role": "user", "content": f"Question {len(history)}: " + paragraph * 2},
                    {"role": "assistant", "content": paragraph * 5}]
            count = len(server.tokenizer.encode_chat(history + turn + [{"role": "user", "content": "And then?"}]))
            if count > 3750:
                break
            history += turn
        prompt = len(server.tokenizer.encode_chat(history + [{"role": "user", "content": "And then?"}]))
        assert 3300 < prompt <= 3750
        seed_conversation(pg, history)
        settings(pg, temperature=0, max_tokens=200)
        pg.evaluate("""() => {
            window.__long = [];
            new PerformanceObserver(list => { for (const e of list.getEntries()) window.__long.push(e.duration); })
                .observe({type: 'longtask', buffered: false});
        }""")
        redraws0 = int(pg.get_attribute("#inside", "data-redraws") or 0)
        t0 = time.monotonic()
        send(pg, "And then?")
        pg.wait_for_function("() => document.body.classList.contains('busy')")
        # while it pre-fills and writes, the page answers at once
        typing = []
        while pg.evaluate("document.body.classList.contains('busy')"):
            t = time.monotonic()
            pg.fill("#seed", "")
            typing.append(time.monotonic() - t)
            time.sleep(0.2)
        seconds = time.monotonic() - t0
        answer = wait_answer(pg)
        wait_inside_done(pg)
        assert "200 tokens" in answer["stats"] and f"prompt {prompt}" in answer["stats"]
        redraws = int(pg.get_attribute("#inside", "data-redraws")) - redraws0
        assert redraws <= seconds / 0.25 + 3, (redraws, seconds)              # at most 4 redraws a second
        assert max(typing) < 0.5, typing
        assert max(pg.evaluate("window.__long"), default=0) < 250, pg.evaluate("window.__long")
        cached = max(c["pos"] for c in slot_map(pg) if c["pos"] is not None) + 1
        assert cached == prompt + 199
        assert p.console_errors() == [] and p.foreign() == []
