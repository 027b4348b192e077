"""The inside panel's event streams: what the engine did for one request, step by step, sent to the page.

    page                                      server
    GET /v1/inside/{channel}        ------>   a Channel opens (its queue); "event: open" once it is ready
    POST /v1/chat/completions
         {"sirocco_inside": channel, ...}  -> Runner.add(..., observer=InsideRequest): "event: start"
                                              engine thread, each step running the request's row:
                                                RowObserver.on_row_step(RowStep) -> loop.call_soon_threadsafe
                                              event loop: the recorder (viz.inside.RowTrace, handed in by the
                                                CLI: serve does not import viz) -> "event: step"
                                              the request finishes or is aborted:  "event: end"

A request names a channel the page opened before it, so no step can happen before anyone listens, and the chat
stream itself stays exactly OpenAI's. Requests that name none carry no observer, and the engine does no
observing work for them. The engine thread only hands the step's references to the event loop; the recording
and the JSON happen there. A channel holds at most ``MAX_PENDING`` unsent events: past that (a page that stopped
reading) step events are dropped and the next one sent says how many (``dropped``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from ..generate.engine import RowStep
from .protocol import APIError, bad

log = logging.getLogger(__name__)

MAX_PENDING = 4096
KEEPALIVE_S = 15.0
UNREAD_S = 30.0          # a channel whose stream never started after this long is let go (its client left at once)
POLL_S = 0.5             # how soon an open stream notices that the server stops
CHANNEL = re.compile(r"[A-Za-z0-9_-]{8,64}")


class Recorder(Protocol):
    """Turns a request's steps into JSON-ready events (``viz.inside.RowTrace``)."""

    def event(self, step: RowStep) -> dict: ...


RecorderFactory = Callable[[Callable[[int], str]], Recorder]     # (token id -> text) -> a new Recorder


class Channel:
    """One page's inside stream: a bounded queue of (event name, data), read by the SSE response."""

    def __init__(self, name: str):
        self.name = name
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(MAX_PENDING)
        self.dropped = 0
        self.closed = False
        self.created = time.monotonic()
        self.started = False

    def push(self, kind: str, data: dict) -> None:
        """Queue an event (event loop only). A full queue drops step events; start and end always fit."""
        if self.closed:
            return
        if self.dropped and kind == "step":
            data = {**data, "dropped": self.dropped}
        try:
            self.queue.put_nowait((kind, data))
            if kind == "step":
                self.dropped = 0
        except asyncio.QueueFull:
            if kind == "step":
                self.dropped += 1
            else:                                  # make room: the page must learn that the request ended
                self.queue.get_nowait()
                self.dropped += 1
                self.queue.put_nowait((kind, data))


class InsideRequest:
    """The engine's ``RowObserver`` for one request, and the runner's ``finish`` for it; events go to a channel."""

    def __init__(self, channel: Channel, request_id: str, recorder: Recorder, loop: asyncio.AbstractEventLoop):
        self.channel, self.request_id, self.recorder, self.loop = channel, request_id, recorder, loop

    def on_row_step(self, step: RowStep) -> None:                 # the engine's thread
        self.loop.call_soon_threadsafe(self._record, step)

    def finish(self, reason: str) -> None:                        # the engine's thread
        self.loop.call_soon_threadsafe(self.channel.push, "end", {"id": self.request_id, "finish_reason": reason})

    def _record(self, step: RowStep) -> None:
        if self.channel.closed:
            return
        try:
            event = self.recorder.event(step)
        except Exception as e:                                    # a recording bug must not touch the request
            log.exception("inside: recording a step failed")
            self.channel.push("error", {"id": self.request_id, "message": f"{type(e).__name__}: {e}"})
            return
        event["id"] = self.request_id
        self.channel.push("step", event)


class InsideHub:
    """The open channels of one server. ``recorder``: makes a request's recorder (None: the inside panel is
    off, and a request naming a channel gets 400)."""

    def __init__(self, recorder: Optional[RecorderFactory], token_text: Callable[[int], str], model_info: dict):
        self.recorder = recorder
        self.token_text = token_text
        self.model_info = model_info
        self.channels: dict[str, Channel] = {}
        self.stopping = False

    def stop(self) -> None:
        """End every inside stream within ``POLL_S`` (they never end on their own, and an HTTP server waits for
        its open responses before it stops). A plain attribute write: safe from a signal handler."""
        self.stopping = True

    def open(self, name: str) -> Channel:
        if self.recorder is None:
            raise APIError(404, "this server was started without the inside panel's recorder", code="not_found")
        if not CHANNEL.fullmatch(name):
            raise bad(f"an inside channel is 8 to 64 letters, digits, '-' or '_', got {name[:80]!r}",
                      param="channel")
        now = time.monotonic()
        for stale in [c for c in self.channels.values() if not c.started and now - c.created > UNREAD_S]:
            self.close(stale)
        if name in self.channels:
            raise APIError(409, f"the inside channel {name!r} is already open", code="channel_in_use")
        channel = self.channels[name] = Channel(name)
        return channel

    def close(self, channel: Channel) -> None:
        channel.closed = True
        if self.channels.get(channel.name) is channel:
            del self.channels[channel.name]

    def requested(self, body: Any, sequences: int) -> Optional[Channel]:
        """The channel a request body names in ``sirocco_inside`` (None if it names none); 400 if the channel is
        not open or the request has more than one sequence."""
        name = body.get("sirocco_inside") if isinstance(body, dict) else None
        if name is None or name is False:
            return None
        if not isinstance(name, str):
            raise bad("'sirocco_inside' must be the name of an open inside channel (GET /v1/inside/NAME)",
                      param="sirocco_inside")
        channel = self.channels.get(name)
        if channel is None:
            raise bad(f"no inside channel {name[:80]!r} is open: open GET /v1/inside/{{name}} first",
                      param="sirocco_inside")
        if sequences != 1:
            raise bad(f"'sirocco_inside' follows one sequence; this request has {sequences} (n x prompts)",
                      param="sirocco_inside")
        return channel

    def observer(self, channel: Channel, request_id: str, prompt_tokens: int, max_tokens: int) -> InsideRequest:
        """The observer of one request on ``channel``; tells the page that the request starts."""
        assert self.recorder is not None
        channel.push("start", {"id": request_id, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                               **self.model_info})
        return InsideRequest(channel, request_id, self.recorder(self.token_text), asyncio.get_running_loop())

    async def stream(self, channel: Channel) -> AsyncIterator[str]:
        """The channel's server-sent events until the client goes away (then the channel closes)."""
        channel.started = True
        try:
            yield sse("open", {"channel": channel.name, **self.model_info})
            quiet = 0.0
            while not self.stopping:
                try:
                    kind, data = await asyncio.wait_for(channel.queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    quiet += POLL_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    continue
                quiet = 0.0
                yield sse(kind, data)
        finally:
            self.close(channel)


def sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
