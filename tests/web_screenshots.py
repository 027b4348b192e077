"""Screenshots of the chat page for the docs, from real servers on the bundled models (``make screenshots``):

    web-chat.png     a conversation with a system prompt, answers with their token counts and rates
    web-inside.png   the inside panel after an answer that took sirocco-tiny's cache past its window of 64
    web-moe.png      the inside panel of sirocco-tiny-moe: each answer token's experts per layer, and the loads

Greedy answers (temperature 0), so a rerun draws the same conversation; the timings differ.

    python tests/web_screenshots.py --out docs/pictures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from serve_fixtures import serve
from web_fixtures import browser, missing, open_page, send, settings, wait_answer, wait_inside_done


def _done(pg) -> None:
    wait_answer(pg)
    if pg.is_visible("#inside"):
        wait_inside_done(pg)
    pg.wait_for_timeout(600)                     # the panel's next redraw, and the status line's next poll


def chat(b, url: str, out: Path) -> None:
    with open_page(b, url + "/", width=1280, height=820) as p:
        pg = p.page
        pg.uncheck("#inside-toggle")
        settings(pg, temperature=0, max_tokens=48)
        pg.fill("#system", "You answer questions about Python.")
        pg.dispatch_event("#system", "change")
        send(pg, "What does the with statement do?")
        _done(pg)
        send(pg, "And the return statement?")
        _done(pg)
        pg.screenshot(path=str(out / "web-chat.png"))


def inside(b, url: str, out: Path) -> None:
    with open_page(b, url + "/", width=1500, height=1000) as p:
        pg = p.page
        settings(pg, temperature=0, max_tokens=72)
        send(pg, "What does the with statement do?")
        _done(pg)
        pg.screenshot(path=str(out / "web-inside.png"))


def moe(b, url: str, out: Path) -> None:
    with open_page(b, url + "/", width=1500, height=1250) as p:
        pg = p.page
        settings(pg, temperature=0, max_tokens=32)
        send(pg, "The with statement")
        _done(pg)
        pg.locator("#inside").screenshot(path=str(out / "web-moe.png"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/pictures"), help="folder of the PNGs")
    args = ap.parse_args(argv)
    why = missing()
    if why is not None:
        print(f"web_screenshots: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with browser() as b:
        with serve("sirocco-tiny", "--max-rows", "2", "--threads", "1") as (url, _):
            chat(b, url, args.out)
            inside(b, url, args.out)
        with serve("sirocco-tiny-moe", "--max-rows", "2", "--threads", "1") as (url, _):
            moe(b, url, args.out)
    for name in ("web-chat.png", "web-inside.png", "web-moe.png"):
        print(f"wrote {args.out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
