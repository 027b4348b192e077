"""What a request must show before the server does any work for it, as a web browser and a flood see the server.

A server on 127.0.0.1 without a key is reachable by every web page its user opens, through the user's browser:

- **Cross-site requests.** A page may POST to any address without asking first if the request is "simple": a
  ``Content-Type`` of ``text/plain``, a form's, or none. The JSON routes therefore take only
  ``Content-Type: application/json`` (415 otherwise, checked in ``app.Server.body`` before the body is read):
  for that type a browser first asks with a preflight ``OPTIONS``, which fails, because the server sends no CORS
  headers unless ``--allow-origin`` names the origin (starlette's CORSMiddleware, for exactly those origins).
- **DNS rebinding.** A page at ``evil.example.com`` can point its own name at 127.0.0.1 and then read the
  answers too: to the browser the server is the page's own origin. What gives it away is the ``Host`` header,
  which names the attacker's domain; ``HostCheck`` answers 403 to every route (``/metrics`` and ``/health``
  too) unless the Host names this server:

      bound to 127.0.0.1 (the default), ::1 or a name:   that address, and localhost, 127.0.0.1, [::1]
      bound to 0.0.0.0 or :: (every address, on purpose): any IP address literal, and localhost
      --allowed-hosts a.example,*.lan.example (or '*'):  those names as well (or any Host at all)

  with or without a port, in any case. An IP literal cannot be rebound (no DNS name is involved, so the page's
  origin is the address itself), which is why a server bound to every address takes any of them: the machine's
  own addresses, a container's published port. A DNS name must be listed. A request without a Host header
  (HTTP/1.0) is let through: browsers always send one, and HTTP/1.1 clients must.
- **A flood.** ``BodyCap`` refuses a body larger than ``--max-body-mib`` with 413: at once when its
  Content-Length says so, or as soon as a chunked body's bytes pass the cap while the route reads it; the rest is
  never read into memory (uvicorn drops it as it arrives). A prompt that does fit the cap but whose characters
  alone prove it longer than the context is refused before tokenizing (``app.Server``, with the tokenizer's
  ``max_chars_per_token``).

Errors are OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` like every other refusal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from .protocol import APIError

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
JSON = "application/json"
MIB = 2**20
# A 128k-token context as text is about 0.5 MB, and 1 to 1.5 MB as token ids or as JSON's \uXXXX escapes of
# non-Latin text: 16 MiB holds a batch of such prompts (a list of prompts, a long chat) with room to spare, while
# keeping what one request can make the server read and parse to a bounded, modest size.
DEFAULT_MAX_BODY_MIB = 16


def host_name(header: str) -> str:
    """The name in a Host header (or a --host/--allowed-hosts value), lower case, without port or trailing dot:
    'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1', 'example.com.' -> 'example.com', '::1' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else h
    if h.count(":") == 1:                         # name:port (a bare IPv6 address has several colons)
        h = h.split(":", 1)[0]
    return h[:-1] if h.endswith(".") else h


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Hosts:
    """The Host names a server bound to ``bind_host`` answers (see the module docstring), plus ``extra``: names,
    ``*.domain`` for any name under a domain, or ``*`` for any Host."""

    def __init__(self, bind_host: str, extra: Iterable[str] = ()):
        bound = host_name(bind_host)
        self.wildcard = bound in WILDCARDS
        names = [host_name(e) for e in extra]
        self.any = "*" in names
        self.names = set(LOOPBACK) | ({bound} if not self.wildcard else set()) | {n for n in names
                                                                                   if not n.startswith("*")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:
            return True
        name = host_name(header)
        return name in self.names or (self.wildcard and is_ip(name)) or (bool(self.suffixes)
                                                                          and name.endswith(self.suffixes))

    def describe(self) -> str:
        """For the 403 message and the log: 'localhost, 127.0.0.1, [::1]' or '... and any IP address'."""
        if self.any:
            return "any Host"
        names = list(LOOPBACK) + sorted(self.names - set(LOOPBACK))
        shown = [f"[{n}]" if ":" in n else n for n in names] + [f"*{s}" for s in self.suffixes]
        return ", ".join(shown) + (" and any IP address" if self.wildcard else "")


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


async def _refuse(error: APIError, scope: dict, receive: Any, send: Any) -> None:
    from starlette.responses import JSONResponse
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


class HostCheck:
    """ASGI middleware: 403 for a request whose Host header ``hosts`` does not allow, before anything else."""

    def __init__(self, app: Any, hosts: Hosts):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if not self.hosts.allows(host):
                return await _refuse(APIError(
                    403, f"The Host header {host!r} does not name this server, which answers {self.hosts.describe()}"
                         f". If you reach it by that name on purpose, start it with --allowed-hosts "
                         f"{host_name(host or '')} (a web page that rebinds its own name to this address sends "
                         f"such a Host too).", code="host_not_allowed"), scope, receive, send)
        await self.app(scope, receive, send)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit / MIB:g} MiB "
                         f"({limit} bytes; sirocco serve --max-body-mib).", code="request_too_large")


class BodyCap:
    """ASGI middleware: 413 for a request body over ``limit`` bytes. A Content-Length over it is refused before
    the app runs; otherwise the bytes are counted as the app receives them, and the receive that passes the
    limit raises the 413 (an ``APIError``, answered by the app's handler) instead of handing them on."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            return await _refuse(too_large(self.limit), scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)
            return message

        await self.app(scope, counted, send)


def check_json(content_type: str | None) -> None:
    """415 unless the Content-Type is application/json (parameters such as '; charset=utf-8' allowed)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != JSON:
        raise APIError(415, f"The request body must be JSON sent with 'Content-Type: {JSON}', got "
                            f"{repr(content_type) if content_type else 'no Content-Type'}.",
                       code="unsupported_media_type")


def middleware(bind_host: str, allowed_hosts: Iterable[str] = (), allow_origins: Iterable[str] = (),
               max_body: int = DEFAULT_MAX_BODY_MIB * MIB) -> list:
    """The app's middleware, outermost first: the Host check, CORS for ``allow_origins`` if any, the body cap."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    stack = [Middleware(HostCheck, hosts=Hosts(bind_host, allowed_hosts))]
    origins = list(allow_origins)
    if origins:
        # The user named these origins to call this server from their pages: private-network preflights too
        # (a browser asks before a public page reaches a loopback address).
        stack.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"],
                                allow_private_network=True))
    stack.append(Middleware(BodyCap, limit=max_body))
    return stack
