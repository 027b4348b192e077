"""The one thread that does all of a server's model work: loading, building the engine, then the engine loop.

PyTorch runs each thread's parallel CPU operations on an OpenMP team of its own. Once a process has two teams
(the model loaded on the main thread and run on another), the OpenMP runtime counts more threads than cores and
lets its workers sleep between operations instead of spinning, so every operation of a decode step pays a
wake-up (docs/performance.md, "AMX: serving, the 1B shape in bf16"). A server process therefore loads the model,
builds the engine and runs ``Runner``'s loop on one ``ModelThread``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class ModelThread:
    """One daemon thread that runs the calls handed to it, in order."""

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
