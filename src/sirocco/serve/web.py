"""The chat page's routes: the page and its files, the status view's numbers, and the inside panel's streams.

    GET /                      the page (static/index.html)                                   open
    GET /static/NAME           its scripts, styles and icon, shipped in the package             open
    GET /v1/status             the numbers of /metrics the status view shows, as JSON          API key
    GET /v1/inside/{channel}   the inside panel's server-sent events (serve.inside)           API key

The files hold no data, so they are served without the key; everything that holds data sits under /v1 behind
it, as the API does. Every file goes out with a Content-Security-Policy that allows nothing but this origin (no
inline script or style, no other host, no frames, no form posts), ``X-Content-Type-Options: nosniff`` and no
referrer. The files are read once, when the app is built: only those names exist, whatever the path says.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

STATIC = Path(__file__).parent / "static"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def static_files(root: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """``{"js/main.js": (bytes, content type), ...}``: every file under ``root`` with a known type."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), TYPES[p.suffix])
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in TYPES}


def model_info(server: Any) -> dict:
    """What the page needs to know of the model: name, context, layers, windows, experts."""
    info: dict = {"model": server.name, "max_model_len": server.max_seq_len, "layers": None, "windows": [],
                  "experts": None, "experts_per_token": None}
    args = getattr(server.engine, "args", None)             # (an engine stand-in of a test may have none)
    if args is not None:
        moe = getattr(args, "moe", None)
        info.update(layers=args.n_layers, windows=sorted({w for w in args.windows() if w is not None}),
                    experts=moe.num_experts if moe is not None else None,
                    experts_per_token=moe.num_experts_per_tok if moe is not None else None)
    return info


def add_routes(app: FastAPI, server: Any, event_stream: type) -> None:
    """Add the page's routes to ``app`` (``server``: its ``serve.app.Server``; ``event_stream``: the response
    class of its streams, which aborts on disconnect)."""
    files = static_files()

    def file(name: str) -> Response:
        hit = files.get(name)
        if hit is None:
            return Response(b"not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
        body, kind = hit
        return Response(body, media_type=kind, headers=HEADERS)

    @app.get("/")
    async def page():
        return file("index.html")

    @app.get("/static/{name:path}")
    async def static(name: str):
        return file(name)

    @app.get("/v1/status")
    async def status(request: Request):
        server.auth(request)
        runner = server.runner
        return {"object": "status", "time": time.time(), "model": server.name, **server.metrics.snapshot(),
                "queued": runner.waiting(), "max_rows": server.engine.max_rows,
                "engine": "failed" if runner.failed is not None else "ok"}

    @app.get("/v1/inside/{channel}")
    async def inside(channel: str, request: Request):
        server.auth(request)
        opened = server.inside.open(channel)
        return event_stream(server.inside.stream(opened), headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})
