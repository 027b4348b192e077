"""The engine loop of a server: the HTTP handlers' commands in, the engine's events out, metrics on the way.

    HTTP handlers (event loop)                       engine thread (serve.model_thread)
    ------------------------------                   ------------------------------------------------------
    runner.add(rid, ids, params, queue)  --inbox-->  engine.add_request(...)  -> future set (or its error)
    runner.abort(rid)                    --inbox-->  engine.abort(rid)
                                                     events = engine.step()
    queue.get() -> Event                 <--------   loop.call_soon_threadsafe(deliver, this step's events)

The engine is single-threaded and only the engine thread touches it. The thread drains the whole inbox before
each step, so an abort takes effect at the next step and an add joins the next step's batch. Each iteration's
commands pass through a ``Channel`` (serve.pipeline), which over pipeline ranks gives the same list to every
rank's loop. Metrics are updated here, where the events are seen first. An event carries everything its client
asked for (the token, its log-probability, its top-k alternatives: the engine's one sampling step returns them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..generate.sampling import SamplingParams
from .metrics import Metrics
from .model_thread import ModelThread
from .pipeline import Channel, Command, LocalChannel, Reply

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    pass


@dataclass
class _Req:
    rid: str
    reply: Reply
    params: SamplingParams
    first: Optional[float] = None
    tokens: int = 0


def _resolve(fut: asyncio.Future, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class Runner:
    """Owns the engine and its thread. ``add``/``abort`` are called from the event loop.

    ``channel`` shares each iteration's commands with the other ranks of a pipeline (default: ``LocalChannel``,
    one process). ``model_thread``: the thread that loaded the model and built the engine, to run the loop on
    (default: a new one). ``on_failure`` is called from the engine thread if it fails (a pipeline's rank 0
    stops serving then)."""

    def __init__(self, engine: Any, metrics: Optional[Metrics] = None, channel: Optional[Channel] = None,
                 model_thread: Optional[ModelThread] = None):
        self.engine = engine
        self.model_thread = model_thread
        self.metrics = metrics or Metrics()
        self.channel: Channel = channel if channel is not None else LocalChannel()
        self.on_failure: Optional[Callable[[], None]] = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reqs: dict[str, _Req] = {}           # engine thread only
        self._lock = threading.Lock()
        self._inbox_adds = 0                        # sequences sent, not yet given to the engine
        self._engine_waiting = 0                    # the engine's own queue, as of the last step
        self._engine_running = 0                    # sequences in rows, as of the last step
        self.failed: Optional[BaseException] = None
        self._loop_done: Optional[Future] = None
        self._counted = self._totals()              # the engine's totals already on their counters

    # -- event-loop side -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine loop on ``model_thread`` (the thread that built the engine), or on a new thread."""
        self._loop_done = (self.model_thread or ModelThread()).submit(self._loop)

    def _running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        if self._running():
            assert self._loop_done is not None
            self._inbox.put(Command("stop"))
            with contextlib.suppress(TimeoutError):
                self._loop_done.result(timeout)

    def waiting(self) -> int:
        """Sequences that will have to wait for a cache row: those sent or queued past the free rows."""
        with self._lock:
            return max(0, self._inbox_adds + self._engine_waiting + self._engine_running - self.engine.max_rows)

    async def add(self, rid: str, prompt: Sequence[int], params: SamplingParams, out: asyncio.Queue,
                  arrival: float, observer: Any = None) -> None:
        """Queue a sequence; returns once the engine accepted it (raises the engine's error if it refused).
        Its events arrive on ``out``, then nothing more; if the engine stops first, an ``EngineFailed`` (or the
        shutdown's error) arrives instead of the rest. ``observer``: the engine's ``RowObserver`` for this
        sequence (on this rank only), told ``finish(reason)`` when it ends."""
        if self.failed is not None:
            raise EngineFailed(f"the engine stopped: {self.failed}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._inbox_adds += 1
        self._inbox.put(Command("add", rid, list(prompt), params, Reply(out, loop, fut, arrival, observer)))
        if self._loop_done is not None and self._loop_done.done():
            self._drain_failing()
        await fut

    def abort(self, rid: str) -> None:
        self._inbox.put(Command("abort", rid))

    # -- the other ranks of a pipeline -------------------------------------------------------------------------
    def run_here(self) -> None:
        """Run the engine loop in this thread until the leader's stop command; re-raise what failed it."""
        self._loop()
        if self.failed is not None:
            raise self.failed

    # -- engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:                          # a bug, a device error, a lost rank: fail loudly
            log.exception("engine loop failed")
            self.failed = e
            self._shutdown(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
            self._drain_failing()
            self.channel.abort()
            if self.on_failure is not None:
                self.on_failure()

    def _serve(self) -> None:
        engine, channel = self.engine, self.channel
        with torch.inference_mode():
            while True:
                cmds = self._take(wait=not engine.has_unfinished()) if channel.leader else []
                for cmd in channel.share(cmds):
                    if cmd.kind == "stop":
                        self._shutdown(RuntimeError("the server is shutting down"))
                        return
                    if cmd.kind == "add":
                        self._add(cmd)
                    else:
                        self._abort(cmd.rid)
                if engine.has_unfinished():
                    st = engine.stats
                    seconds, tokens = st.seconds, st.tokens
                    events = engine.step()
                    if st.tokens > tokens:                          # a model call ran (not only abort events)
                        self.metrics.busy.inc(st.seconds - seconds)
                        self.metrics.step_tokens.observe(st.tokens - tokens)
                    self._count()                                   # before a client that got its answer looks
                    self._dispatch(events)
                self._publish()

    def _take(self, wait: bool) -> list[Command]:
        """The inbox's commands; with ``wait``, the first waited for (at most the channel's heartbeat)."""
        cmds = []
        if wait:
            try:
                cmds.append(self._inbox.get(timeout=self.channel.heartbeat_s))
            except queue.Empty:
                pass
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _add(self, cmd: Command) -> None:
        error = None
        assert cmd.params is not None
        observer = cmd.reply.observer if cmd.reply is not None else None
        try:
            if observer is None:
                self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.rid)
            else:
                self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.rid, observer=observer)
        except Exception as e:                              # PromptTooLong, SiroccoError, ValueError: the caller's
            error = e
        reply = cmd.reply
        if reply is None:                                   # another rank's: refused or not alike, nobody to tell
            return
        if error is None:
            self._reqs[cmd.rid] = _Req(cmd.rid, reply, cmd.params)
            self.metrics.prompt_tokens.inc(len(cmd.prompt))
        with self._lock:
            self._inbox_adds -= 1
            self._engine_waiting = self.engine.num_waiting
            self._engine_running = self.engine.num_running
        reply.loop.call_soon_threadsafe(_resolve, reply.future, error)

    def _abort(self, rid: str) -> None:
        if not self.engine.abort(rid):                      # unknown or already finished: nothing will follow
            self._reqs.pop(rid, None)

    def _dispatch(self, events) -> None:
        now = time.perf_counter()
        m = self.metrics
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            r = self._reqs.get(ev.request_id)
            if r is None:
                continue
            if ev.token is not None:
                r.tokens += 1
                m.generation_tokens.inc()
                if r.first is None:
                    r.first = now
                    m.ttft.observe(now - r.reply.arrival)
            c = ev.completion
            if c is not None:
                del self._reqs[r.rid]
                if r.reply.observer is not None:
                    r.reply.observer.finish(c.finish_reason or "abort")
                m.success.labels(finish_reason=c.finish_reason or "abort").inc()
                m.e2e.observe(now - r.reply.arrival)
                if r.first is not None and r.tokens > 1:
                    m.tpot.observe((now - r.first) / (r.tokens - 1))
            batches.setdefault(r.reply.loop, []).append((r.reply.queue, ev))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _publish(self) -> None:
        running, waiting = self.engine.num_running, self.engine.num_waiting
        with self._lock:
            self._engine_waiting, self._engine_running = waiting, running
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)
        store = getattr(self.engine, "prefix", None)
        if store is not None:
            self.metrics.prefix_bytes.set(store.nbytes)
            self.metrics.prefix_entries.set(len(store))

    def _totals(self) -> dict[str, int]:
        """The engine's running totals that counters follow (by the counter's name in ``Metrics``)."""
        st, store = getattr(self.engine, "stats", None), getattr(self.engine, "prefix", None)
        totals = {"spec_proposed": getattr(st, "proposed_tokens", 0),
                  "spec_accepted": getattr(st, "accepted_tokens", 0)}
        if store is not None:
            totals.update(prefix_queries=store.stats.queries, prefix_hits=store.stats.hits,
                          prefix_hit_tokens=store.stats.hit_tokens)
        return totals

    def _count(self) -> None:
        """Put what the engine's totals gained since the last call on their counters."""
        for name, total in self._totals().items():
            if total > self._counted[name]:
                getattr(self.metrics, name).inc(total - self._counted[name])
                self._counted[name] = total

    def _shutdown(self, error: BaseException) -> None:
        """Every request still open gets ``error`` on its queue; the engine's rows are freed."""
        for rid, r in list(self._reqs.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            if r.reply.observer is not None:
                r.reply.observer.finish("error")
            r.reply.loop.call_soon_threadsafe(r.reply.queue.put_nowait, error)
        self._reqs.clear()

    def _drain_failing(self) -> None:
        """After a failure, refuse what is still in the inbox."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd.kind == "add" and cmd.reply is not None:
                with self._lock:
                    self._inbox_adds -= 1
                cmd.reply.loop.call_soon_threadsafe(_resolve, cmd.reply.future,
                                                    EngineFailed(f"the engine stopped: {self.failed}"))
            elif cmd.kind == "stop":
                return
