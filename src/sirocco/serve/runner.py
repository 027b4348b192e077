"""The engine in its own thread, so that the event loop never waits for the model.

    HTTP handlers (event loop)                       engine thread
    ------------------------------                   ------------------------------------------------------
    runner.add(rid, ids, params, queue)  --inbox-->  engine.add_request(...)  -> future set (or its error)
    runner.abort(rid)                    --inbox-->  engine.abort(rid)
                                                     events = engine.step()
    queue.get() -> (Event, top)          <--------   loop.call_soon_threadsafe(deliver, this step's events)

The engine is single-threaded and only this thread touches it. The thread drains the whole inbox before each
step, so an abort takes effect at the next step and an add joins the next step's batch. Metrics are updated
here, where the events are seen first.

Over pipeline ranks every rank runs this same loop on its own Engine, and a channel keeps the engines equal:
rank 0's thread collects each iteration's commands (add with the request id, prompt ids and sampling params;
abort; stop) and ``channel.share`` hands that list to every rank, which applies it in the same order and steps
when its engine has work. One process uses ``LocalChannel``, which shares nothing; ``serve.pipeline`` has the
broadcasting one. The other ranks run the loop in their main thread (``run_here``) with no inbox, no HTTP and
no one to deliver events to, so their events are dropped.

One thread for all the model's work: PyTorch's CPU threads are an OpenMP team per thread that runs parallel
operations, and once a process has two teams (the model loaded on the main thread, run on another) the OpenMP
runtime counts more threads than cores and lets its workers sleep at once instead of spinning between
operations, so every operation of a decode step pays a wake-up, and decode is measurably slower
(docs/performance.md, "AMX: serving"). A server process therefore loads the model, builds the engine and runs this
loop on one ``ModelThread``.

Top-k alternatives for logprobs: the engine's sampler returns only the chosen token's log-probability, so the
engine is handed an executor wrapper (``TopLogprobsExecutor``) that takes the top k of the same logits at the
same sampling call, for the sequences that asked, and queues them on their sampling params; the runner pairs
them with the sequence's next event. Nothing is recomputed and nothing is approximated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from ..distributed.launch import DistContext, peer_errors
from ..generate.sampling import SamplingParams
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ServeParams(SamplingParams):
    """SamplingParams plus how many alternatives per token the client wants; ``top_out`` receives them (a list
    shared by any copy the engine makes with ``dataclasses.replace``)."""

    top_logprobs: int = 0
    top_out: list = field(default_factory=list, compare=False, repr=False)


class TopLogprobsExecutor:
    """Wraps the engine's executor: after each sampling call, the k most likely tokens and their log-probabilities
    (of the unmodified distribution, like the engine's own logprobs) for every row whose params want them.

    With ``ctx`` (a pipeline), only the last rank has the logits: it computes the top k and broadcasts them, and
    rank 0, the one that answers the clients, stores them. Every rank knows how many rows and which k from the
    params, which are the same everywhere, so the receivers size the message without asking."""

    def __init__(self, inner: Any, ctx: Optional[DistContext] = None):
        self.inner = inner
        self.ctx = ctx if ctx is not None and ctx.world_size > 1 else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sample(self, logits: Optional[torch.Tensor], params: Sequence[SamplingParams], generators, *args, **kwargs):
        out = self.inner.sample(logits, params, generators, *args, **kwargs)
        want = [(i, p) for i, p in enumerate(params) if isinstance(p, ServeParams) and p.top_logprobs > 0]
        if not want or (logits is None and self.ctx is None):
            return out
        k = min(max(p.top_logprobs for _, p in want), self.inner.model.args.vocab_size)
        values = ids = None
        if logits is not None:
            rows = torch.tensor([i for i, _ in want], device=logits.device)
            top = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1).topk(k, dim=-1)
            values, ids = top.values, top.indices
        if self.ctx is not None:
            values, ids = self._share(values, ids, len(want), k)
            if self.ctx.rank != 0:
                return out
        assert values is not None and ids is not None
        value_rows, id_rows = values.tolist(), ids.tolist()
        for j, (_, p) in enumerate(want):
            p.top_out.append(list(zip(id_rows[j][:p.top_logprobs], value_rows[j][:p.top_logprobs])))
        return out

    def _share(self, values: Optional[torch.Tensor], ids: Optional[torch.Tensor], rows: int, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last rank's (rows, k) top values and ids, on every rank. float64 holds every fp32 log-probability
        and token id exactly, so rank 0 stores the numbers one process would: one message."""
        ctx = self.ctx
        assert ctx is not None
        if ctx.is_last:
            assert values is not None and ids is not None
            packed = torch.stack([values.double(), ids.double()])                     # (2, rows, k)
        else:
            packed = torch.empty(2, rows, k, dtype=torch.float64, device=ctx.device)
        with peer_errors(ctx, "receiving the top logprobs"):
            dist.broadcast(packed, src=ctx.last)
        return packed[0], packed[1].long()


class EngineFailed(RuntimeError):
    pass


@dataclass
class _Reply:
    """Where an add's acceptance and events go on rank 0; it never leaves the process."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float


@dataclass
class Command:
    """One entry of the engine thread's inbox: ``add`` (rid, prompt ids, params), ``abort`` (rid) or ``stop``.
    Every rank of a pipeline applies the same commands in the same order; ``reply`` is rank 0's alone."""

    kind: str
    rid: str = ""
    prompt: list[int] = field(default_factory=list)
    params: Optional[SamplingParams] = None
    reply: Optional[_Reply] = field(default=None, compare=False)

    def shared(self) -> "Command":
        """What the other ranks receive: the command without rank 0's reply."""
        return Command(self.kind, self.rid, self.prompt, self.params)


class Channel(Protocol):
    """How each iteration's commands reach every rank's engine (see the module docstring).

    ``leader``: this rank collects the commands (rank 0) rather than receives them. ``heartbeat_s``: longest
    wait for a command while idle before ``share`` is called anyway (None: no limit), so the other ranks, which
    wait inside ``share``, never reach their timeout."""

    leader: bool
    heartbeat_s: Optional[float]

    def share(self, cmds: list[Command]) -> list[Command]:
        """Called once per iteration on every rank: the leader's commands, on every rank."""
        ...

    def abort(self) -> None:
        """The loop failed here: make the other ranks fail now rather than at their timeout."""
        ...


class LocalChannel:
    """One process: nothing to share, and nobody waits for a heartbeat."""

    leader = True
    heartbeat_s: Optional[float] = None

    def share(self, cmds: list[Command]) -> list[Command]:
        return cmds

    def abort(self) -> None:
        pass


@dataclass
class _Req:
    rid: str
    reply: _Reply
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


class ModelThread:
    """One daemon thread that runs the calls handed to it, in order: a server's model work (loading, building the
    engine, then ``Runner``'s loop) on the one thread that runs PyTorch's parallel operations (see the module's
    docstring for why)."""

    def __init__(self, name: str = "sirocco-engine"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            fn, fut = self._calls.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the thread after the calls before it; its result or error on the future."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the thread, waited for: its result, or its error raised here."""
        return self.submit(lambda: fn(*args, **kwargs)).result()


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
                  arrival: float) -> None:
        """Queue a sequence; returns once the engine accepted it (raises the engine's error if it refused).
        Its events, as ``(Event, top_logprobs or None)``, arrive on ``out``."""
        if self.failed is not None:
            raise EngineFailed(f"the engine stopped: {self.failed}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._inbox_adds += 1
        self._inbox.put(Command("add", rid, list(prompt), params, _Reply(out, loop, fut, arrival)))
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
                    seconds, tokens = engine.stats.seconds, engine.stats.tokens
                    events = engine.step()
                    if engine.stats.tokens > tokens:                # a model call ran (not only abort events)
                        self.metrics.busy.inc(engine.stats.seconds - seconds)
                        self.metrics.step_tokens.observe(engine.stats.tokens - tokens)
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
        try:
            self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.rid)
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
            top = None
            if ev.token is not None:
                r.tokens += 1
                m.generation_tokens.inc()
                if r.first is None:
                    r.first = now
                    m.ttft.observe(now - r.reply.arrival)
                if isinstance(r.params, ServeParams) and r.params.top_logprobs > 0 and r.params.top_out:
                    top = r.params.top_out.pop(0)
            c = ev.completion
            if c is not None:
                del self._reqs[r.rid]
                m.success.labels(finish_reason=c.finish_reason or "abort").inc()
                m.e2e.observe(now - r.reply.arrival)
                if r.first is not None and r.tokens > 1:
                    m.tpot.observe((now - r.first) / (r.tokens - 1))
            batches.setdefault(r.reply.loop, []).append((r.reply.queue, (ev, top)))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _publish(self) -> None:
        running, waiting = self.engine.num_running, self.engine.num_waiting
        with self._lock:
            self._engine_waiting, self._engine_running = waiting, running
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)

    def _shutdown(self, error: BaseException) -> None:
        """Every request still open gets ``error`` on its queue; the engine's rows are freed."""
        for rid, r in list(self._reqs.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            r.reply.loop.call_soon_threadsafe(r.reply.queue.put_nowait, (None, error))
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
