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

Top-k alternatives for logprobs: the engine's sampler returns only the chosen token's log-probability, so the
engine is handed an executor wrapper (``TopLogprobsExecutor``) that takes the top k of the same logits at the
same sampling call, for the sequences that asked, and queues them on their sampling params; the runner pairs
them with the sequence's next event. Nothing is recomputed and nothing is approximated.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

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
    (of the unmodified distribution, like the engine's own logprobs) for every row whose params want them."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sample(self, logits: Optional[torch.Tensor], params: Sequence[SamplingParams], generators, *args, **kwargs):
        out = self.inner.sample(logits, params, generators, *args, **kwargs)
        want = [(i, p) for i, p in enumerate(params) if isinstance(p, ServeParams) and p.top_logprobs > 0]
        if want and logits is not None:
            k = min(max(p.top_logprobs for _, p in want), logits.shape[-1])
            rows = torch.tensor([i for i, _ in want], device=logits.device)
            top = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1).topk(k, dim=-1)
            values, ids = top.values.tolist(), top.indices.tolist()
            for j, (_, p) in enumerate(want):
                p.top_out.append(list(zip(ids[j][:p.top_logprobs], values[j][:p.top_logprobs])))
        return out


class EngineFailed(RuntimeError):
    pass


@dataclass
class _Req:
    rid: str
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    params: SamplingParams
    arrival: float
    first: Optional[float] = None
    tokens: int = 0


def _resolve(fut: asyncio.Future, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _busy(stats) -> tuple[float, int]:
    """The engine's model-step seconds and tokens so far."""
    return stats.prefill_seconds + stats.decode_seconds, stats.prefill_tokens + stats.decode_tokens


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class Runner:
    """Owns the engine and its thread. ``add``/``abort`` are called from the event loop."""

    def __init__(self, engine: Any, metrics: Optional[Metrics] = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reqs: dict[str, _Req] = {}           # engine thread only
        self._lock = threading.Lock()
        self._inbox_adds = 0                        # sequences sent, not yet given to the engine
        self._engine_waiting = 0                    # the engine's own queue, as of the last step
        self._engine_running = 0                    # sequences in rows, as of the last step
        self.failed: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    # -- event-loop side -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sirocco-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

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
        self._inbox.put(("add", rid, list(prompt), params, out, loop, fut, arrival))
        if self._thread is not None and not self._thread.is_alive():
            self._drain_failing()
        await fut

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    # -- engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:                          # a bug outside step(): fail loudly, never hang
            log.exception("engine thread failed")
            self.failed = e
            self._shutdown(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
            self._drain_failing()

    def _serve(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while True:
                cmds = [self._inbox.get()] if not engine.has_unfinished() else []
                while True:
                    try:
                        cmds.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for cmd in cmds:
                    if cmd[0] == "stop":
                        self._shutdown(RuntimeError("the server is shutting down"))
                        return
                    if cmd[0] == "add":
                        self._add(*cmd[1:])
                    else:
                        self._abort(cmd[1])
                if engine.has_unfinished():
                    before = _busy(engine.stats)
                    try:
                        events = engine.step()
                    except Exception as e:                  # a bug or a device error: fail every request
                        log.exception("engine step failed")
                        self.failed = e
                        self._shutdown(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
                        self._drain_failing()
                        return
                    self._count_step(engine.stats, before)
                    self._dispatch(events)
                self._publish()

    def _add(self, rid, prompt, params, out, loop, fut, arrival) -> None:
        error = None
        try:
            self.engine.add_request(prompt, params, request_id=rid)
        except Exception as e:                              # PromptTooLong, SiroccoError, ValueError: the caller's
            error = e
        else:
            self._reqs[rid] = _Req(rid, out, loop, params, arrival)
            self.metrics.prompt_tokens.inc(len(prompt))
        with self._lock:
            self._inbox_adds -= 1
            self._engine_waiting = self.engine.num_waiting
            self._engine_running = self.engine.num_running
        loop.call_soon_threadsafe(_resolve, fut, error)

    def _abort(self, rid: str) -> None:
        if not self.engine.abort(rid):                      # unknown or already finished: nothing will follow
            self._reqs.pop(rid, None)

    def _count_step(self, stats, before: tuple[float, int]) -> None:
        seconds, tokens = _busy(stats)
        if tokens > before[1]:                              # a model call ran (not only abort events)
            self.metrics.busy.inc(seconds - before[0])
            self.metrics.step_tokens.observe(tokens - before[1])

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
                    m.ttft.observe(now - r.arrival)
                if isinstance(r.params, ServeParams) and r.params.top_logprobs > 0 and r.params.top_out:
                    top = r.params.top_out.pop(0)
            c = ev.completion
            if c is not None:
                del self._reqs[r.rid]
                m.success.labels(finish_reason=c.finish_reason or "abort").inc()
                m.e2e.observe(now - r.arrival)
                if r.first is not None and r.tokens > 1:
                    m.tpot.observe((now - r.first) / (r.tokens - 1))
            batches.setdefault(r.loop, []).append((r.queue, (ev, top)))
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
            r.loop.call_soon_threadsafe(r.queue.put_nowait, (None, error))
        self._reqs.clear()

    def _drain_failing(self) -> None:
        """After a failure, refuse what is still in the inbox."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, out, loop, fut, arrival = cmd
                with self._lock:
                    self._inbox_adds -= 1
                loop.call_soon_threadsafe(_resolve, fut, EngineFailed(f"the engine stopped: {self.failed}"))
            elif cmd[0] == "stop":
                return
