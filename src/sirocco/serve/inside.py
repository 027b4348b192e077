"""The inside panel's event streams: what the engine did for one request, step by step, sent to the page.

    page                                      server
    GET /v1/inside/{channel}        ------>   a Channel opens (its queue); "event: open" once it is ready
    POST /v1/chat/completions
         {"sirocco_inside": channel, ...}  -> Runner.add(..., observer=InsideRequest): "event: start"
                                              engine thread, each step running the request's row:
                                                RowObserver.on_row_step(RowStep) -> a deque (the loop is woken
                                                only by the first step of a batch)
                                              event loop, at most every FLUSH_S: the steps since the last
                                                batch to the recorder (viz.inside.RowTrace, handed in by the
                                                CLI: serve does not import viz) -> "event: steps"
                                              the request finishes or is aborted: its last batch, "event: end"

A request names a channel the page opened before it, so no step can happen before anyone listens, and the chat
stream itself stays exactly OpenAI's. Requests that name none carry no observer, and the engine does no
observing work for them. The engine thread only hands the step's references to the event loop; the recording
and the JSON happen there, a batch at a time: the page redraws a few times a second whatever the token rate, so
the steps of a tenth of a second make one event, and only the last one's mask is recorded. A channel holds at
most ``MAX_PENDING`` unsent events: past that (a page that stopped reading) batches are dropped and the next one
sent says how many steps it misses (``dropped``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from ..generate.engine import RowStep
from .protocol import APIError, bad

log = logging.getLogger(__name__)

MAX_PENDING = 4096
KEEPALIVE_S = 15.0
UNREAD_S = 30.0          # a channel whose stream never started after this long is let go (its client left at once)
POLL_S = 0.5             # how soon an open stream notices that the server stops
FLUSH_S = 0.1            # the steps of this long make one event
CHANNEL = re.compile(r"[A-Za-z0-9_-]{8,64}")


class Recorder(Protocol):
    """Turns a request's steps into JSON-ready events (``viz.inside.RowTrace``)."""

    def event(self, steps: Sequence[RowStep]) -> dict: ...


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
        """Queue an event (event loop only). A full queue drops batches of steps; start and end always fit."""
        if self.closed:
            return
        if self.dropped and kind == "steps":
            data = {**data, "dropped": self.dropped}
        try:
            self.queue.put_nowait((kind, data))
            if kind == "steps":
                self.dropped = 0
        except asyncio.QueueFull:
            if kind != "steps":                    # make room: the page must learn that the request ended
                old_kind, old = self.queue.get_nowait()
                self.dropped += len(old.get("steps", ())) if old_kind == "steps" else 0
                self.queue.put_nowait((kind, data))
            else:
                self.dropped += len(data.get("steps", ()))


class InsideRequest:
    """The engine's ``RowObserver`` for one request, and the runner's ``finish`` for it; events go to a channel."""

    def __init__(self, channel: Channel, request_id: str, recorder: Recorder, loop: asyncio.AbstractEventLoop):
        self.channel, self.request_id, self.recorder, self.loop = channel, request_id, recorder, loop
        self.pending: collections.deque[RowStep] = collections.deque()    # appended by the engine's thread
        self.scheduled = False                     # a flush is on its way (set by the engine's thread)
        self.timer: asyncio.TimerHandle | None = None
        self.failed = False

    def on_row_step(self, step: RowStep) -> None:                 # the engine's thread
        self.pending.append(step)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._schedule)

    def finish(self, reason: str) -> None:                        # the engine's thread (or the loop's)
        self.loop.call_soon_threadsafe(self._finish, reason)

    def _schedule(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(FLUSH_S, self._flush)

    def _finish(self, reason: str) -> None:
        self._flush()
        self.channel.push("end", {"id": self.request_id, "finish_reason": reason})

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.scheduled = False                     # before taking the steps: one appended after is flushed later
        steps = []
        while self.pending:
            steps.append(self.pending.popleft())
        if not steps or self.channel.closed or self.failed:
            return
        try:
            event = self.recorder.event(steps)
        except Exception as e:                                    # a recording bug must not touch the request
            log.exception("inside: recording a step failed")
            self.failed = True
            self.channel.push("error", {"id": self.request_id, "message": f"{type(e).__name__}: {e}"})
            return
        event["id"] = self.request_id
        self.channel.push("steps", event)


class InsideHub:
    """The open channels of one server. ``recorder``: makes a request's recorder (None: the inside panel is
    off, and a request naming a channel gets 400)."""

    def __init__(self, recorder: RecorderFactory | None, token_text: Callable[[int], str], model_info: dict):
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

    def requested(self, body: Any, sequences: int) -> Channel | None:
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
