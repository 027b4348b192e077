"""The chat page in a real headless browser: Debian's chromium driven by Playwright (its own browser download is
not used), the page's controls, and a checkpoint whose answer is chosen in advance. For the browser tests and
the screenshots (``tests/web_screenshots.py``).

``make browser`` installs chromium when it is missing; the browser tests are skipped without it, or fail when
``SIROCCO_BROWSER_TESTS=require`` (what ``make test`` sets) says it must be there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import torch

from serve_fixtures import TOKENIZER
from sirocco.checkpoint import save_consolidated
from sirocco.config import preset
from sirocco.model import build_model
from sirocco.tokenizer import load_tokenizer

REQUIRED = os.environ.get("SIROCCO_BROWSER_TESTS") == "require"


def chromium() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> Optional[str]:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if chromium() is None:
        return "Debian's chromium is not installed (make browser)"
    return None


@contextlib.contextmanager
def browser() -> Iterator:
    """A headless chromium (Debian's executable) under Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Page:
    """A page of its own browser context (fresh storage), with what it logged and every request it made."""

    page: object
    url: str
    console: list = field(default_factory=list)          # (type, text)
    errors: list = field(default_factory=list)           # uncaught exceptions
    requests: list = field(default_factory=list)         # (method, url)
    responses: list = field(default_factory=list)        # (status, url)

    def foreign(self) -> list[str]:
        """Requests that went anywhere but the server's own host and port."""
        host = urlsplit(self.url).netloc
        return [u for _, u in self.requests if urlsplit(u).netloc != host]

    def console_errors(self) -> list[str]:
        return [t for kind, t in self.console if kind == "error"] + [str(e) for e in self.errors]

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        """Close the page's context: its streams end, and the server can stop without waiting for them."""
        self.page.context.close()


def open_page(b, url: str, width: int = 1500, height: int = 950, wait_model: bool = True) -> Page:
    """A new page on ``url`` (``with open_page(...) as p:`` closes it)."""
    context = b.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
    pg = context.new_page()
    out = Page(pg, url)
    pg.on("console", lambda m: out.console.append((m.type, m.text)))
    pg.on("pageerror", lambda e: out.errors.append(e))
    pg.on("request", lambda r: out.requests.append((r.method, r.url)))
    pg.on("response", lambda r: out.responses.append((r.status, r.url)))
    pg.goto(url)
    if wait_model:
        pg.wait_for_selector("#model-name:not(:empty)", timeout=30000)
    return out


def settings(pg, **values) -> None:
    """Set the page's sampling settings (temperature, top_p, max_tokens, seed) as a user would."""
    for name, value in values.items():
        pg.fill(f"#{name}", str(value))
        pg.dispatch_event(f"#{name}", "change")


def send(pg, text: str) -> None:
    pg.fill("#input", text)
    pg.press("#input", "Enter")


def wait_answer(pg, timeout: float = 120) -> dict:
    """Wait until no answer streams; the last message's text and stats line."""
    pg.wait_for_selector("article.assistant", timeout=timeout * 1000)
    pg.wait_for_function("() => !document.body.classList.contains('busy')", timeout=timeout * 1000)
    return pg.evaluate("""() => {
        const a = [...document.querySelectorAll('#messages article')].pop();
        return {text: a.querySelector('.body').textContent, stats: a.querySelector('.stats').textContent,
                role: a.classList.contains('assistant') ? 'assistant' : 'user'};
    }""")


def inside_request(pg) -> str:
    """The request the inside panel follows ("" before the first)."""
    return pg.get_attribute("#inside", "data-request") or ""


def wait_inside_done(pg, after: str = "", timeout: float = 60) -> None:
    """Wait until the inside panel shows a finished request other than ``after`` (the one it showed before the
    action that sent a new one: until the new request's stream starts, the panel still shows the old one done)."""
    pg.wait_for_function("""(after) => { const e = document.getElementById('inside');
        return e.dataset.state === 'done' && e.dataset.request !== after; }""", arg=after, timeout=timeout * 1000)


def slot_map(pg) -> list[dict]:
    """The inside panel's slot cells: slot, position and token id (None for an empty slot)."""
    return pg.evaluate("""() => [...document.querySelectorAll('#slots .slot')].map(c => ({
        slot: Number(c.dataset.slot), pos: c.dataset.pos === undefined ? null : Number(c.dataset.pos),
        token: c.dataset.token === undefined ? null : Number(c.dataset.token),
        text: c.querySelector('.tok').textContent}))""")


def watch_text_lengths(pg) -> None:
    """Record the last message's text length at every change (``window.__lengths``)."""
    pg.evaluate("""() => {
        window.__lengths = [];
        const box = document.getElementById('messages');
        new MutationObserver(() => {
            const a = [...box.querySelectorAll('article.assistant .body')].pop();
            if (a) window.__lengths.push(a.textContent.length);
        }).observe(box, {subtree: true, childList: true, characterData: true});
    }""")


def seed_conversation(pg, messages: list[dict], system: str = "") -> None:
    """Put a conversation in the page's storage, as if it had been had, and reload."""
    conv = {"id": "seeded", "title": "seeded", "system": system, "messages": messages, "created": 1, "updated": 2}
    pg.evaluate("(c) => { localStorage.setItem('sirocco.conversations', JSON.stringify({seeded: c}));"
                " localStorage.setItem('sirocco.current', JSON.stringify('seeded')); }", conv)
    pg.reload()
    pg.wait_for_selector("#model-name:not(:empty)")


# -- a model whose answer is chosen in advance -------------------------------------------------------------------------
def write_parrot_checkpoint(folder: Path, answer: str) -> Path:
    """A tiny Mistral (the bundled tokenizer) whose greedy answer to any chat prompt is ``answer``.

    Every attention and feed-forward output projection is zero, so each position's last hidden state is its own
    token's embedding: the model is a table from the current token to the next. Each token of the chain (the chat
    template's last token, then the answer's tokens) gets an embedding along a dimension of its own, and the
    output row of its successor reads that dimension. A token that appears twice in ``answer`` must have the same
    successor both times (its last appearance excepted: after it, the answer starts over from that point).
    """
    tokenizer = load_tokenizer(TOKENIZER)
    chain = [tokenizer.encode_chat([{"role": "user", "content": "x"}])[-1]]
    chain += tokenizer.encode(answer, bos=False, eos=False)
    following: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        if following.setdefault(a, b) != b and a != chain[-1]:
            raise ValueError(f"token {a} is followed by both {following[a]} and {b} in {answer!r}")
    args = preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512)
    model = build_model(args, dtype=torch.float32, seed=0)
    dims = {a: i for i, a in enumerate(following)}
    if len(dims) > args.dim:
        raise ValueError(f"{len(dims)} distinct tokens need more than the model's {args.dim} dimensions")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for a, b in following.items():
            model.tok_embeddings.weight[a, dims[a]] = 1.0
            model.output.weight[b, dims[a]] = 50.0
    folder.mkdir(parents=True, exist_ok=True)
    save_consolidated(model, args, folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.model")
    return folder


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
