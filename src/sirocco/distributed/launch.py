"""Process groups for pipeline parallelism: who am I, which device, and failing together.

Every pipeline run has one process per stage, started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) or, on one machine from Python, by ``spawn_local``. Rules this module enforces:

* Device: ``cuda:LOCAL_RANK`` with NCCL where CUDA is available, else the CPU with gloo.
* Agreement: before anything is split, every rank compares what it is about to run (a fingerprint of the
  config and checkpoint) with every other rank; a difference fails on *every* rank with one message naming
  the ranks, instead of a hang or silently wrong tokens later.
* Failing together: the work of a rank runs inside ``fail_together``. An exception aborts the process group,
  which closes this rank's connections, so a peer blocked in a send, receive or collective gets an error at
  once (about a second with gloo) instead of waiting for the group's timeout. The timeout (default 10 minutes,
  long enough for one pre-fill chunk of a large model on a CPU) remains the guard against a rank that hangs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SiroccoError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(SiroccoError):
    """Ranks disagree (different checkpoints, configs, world sizes), or a peer failed or went silent."""


@dataclass
class DistContext:
    """This process's place in the pipeline.

    Attributes:
        rank, world_size: global rank and number of processes (one pipeline stage each).
        local_rank: rank on this node; picks the GPU.
        device: where this rank's stage lives.
        process_group: "gloo" or "nccl".
        timeout_s: how long a collective or receive may wait before the rank gives up.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    process_group: str
    timeout_s: float

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def prev(self) -> int:
        return self.rank - 1

    @property
    def next(self) -> int:
        return self.rank + 1

    @property
    def last(self) -> int:
        return self.world_size - 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(local_rank: int, process_group: str | None = None) -> tuple[torch.device, str]:
    """(device, process group) for a rank: NCCL on ``cuda:local_rank`` when CUDA is there (and gloo was not asked
    for), else gloo on the CPU."""
    if process_group not in (None, "gloo", "nccl"):
        raise DistributedError(f"unknown process-group backend {process_group!r}; use gloo (CPU) or nccl (CUDA)")
    use_cuda = torch.cuda.is_available() and process_group != "gloo"
    if process_group == "nccl" and not torch.cuda.is_available():
        raise DistributedError("process group nccl needs CUDA, which is not available on this machine; use gloo")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "
                                   f"CUDA devices: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(process_group: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     threads: int | None = None) -> DistContext:
    """Join the process group described by torchrun's environment variables (or reuse the current one).

    Args:
        process_group: None (NCCL with CUDA, else gloo), "gloo" or "nccl".
        timeout_s: longest wait of any receive or collective, and of the start-up rendezvous.
        threads: CPU threads of this rank (default: the cores divided among the node's ranks).
    """
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        raise DistributedError("not started as a distributed job (RANK and WORLD_SIZE are unset): launch with "
                               "torchrun --nproc-per-node N ... --pipeline-ranks N")
    local = rank if local is None else local
    device, process_group = pick_device(local, process_group)
    if device.type == "cpu":
        # Ranks on one node share its cores: oversubscribing them makes every stage slower.
        per_node = _env_int("LOCAL_WORLD_SIZE") or world
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // per_node))
    elif threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group(process_group, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                      process_group=dist.get_backend(), timeout_s=timeout_s)
    log.info("rank %d of %d (local %d): %s on %s, timeout %.0f s, %d threads", ctx.rank, ctx.world_size, local,
             ctx.process_group, device, timeout_s, torch.get_num_threads())
    return ctx


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (a config dict, checkpoint headers, a seed...)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def agree(ctx: DistContext, what: str, value: Any) -> None:
    """Raise the same ``DistributedError`` on every rank unless all ranks hold an equal ``value``.

    ``what`` names the value in the message (for example "checkpoint fingerprint")."""
    values: list[Any] = [None] * ctx.world_size
    with peer_errors(ctx, f"comparing the {what} of all ranks"):
        dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        groups: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            groups.setdefault(repr(v), []).append(r)
        detail = "; ".join(f"ranks {ranks}: {v}" for v, ranks in groups.items())
        raise DistributedError(f"the ranks disagree on the {what} ({detail}); every rank must run the same "
                               f"checkpoint, config and options")


@contextmanager
def peer_errors(ctx: DistContext, doing: str) -> Iterator[None]:
    """Turn a communication failure (a peer died, aborted or timed out) into a ``DistributedError`` that says
    so on this rank, instead of a raw backend trace."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:          # gloo and NCCL errors (DistBackendError is a RuntimeError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {ctx.rank}: lost the other ranks while {doing} (another rank failed or "
                               f"timed out after {ctx.timeout_s:.0f} s; see its log): {first}") from e


def abort() -> None:
    """Tear this rank out of the process group at once, closing its connections, so that peers waiting on it
    fail now rather than at the timeout."""
    if not dist.is_initialized():
        return
    try:
        aborter = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if aborter is not None:
            aborter()
        else:
            dist.destroy_process_group()
    except Exception as e:  # already broken: nothing more to release
        log.debug("abort: %s", e)


@contextmanager
def fail_together(ctx: DistContext) -> Iterator[None]:
    """Run a rank's work; on any exception, log it with the rank, abort the group (peers fail within
    seconds), and re-raise."""
    try:
        yield
    except BaseException as e:
        log.error("rank %d failed: %s: %s; aborting the process group", ctx.rank, type(e).__name__, e)
        abort()
        raise


def shutdown(ctx: DistContext) -> None:
    """Leave the group cleanly: wait for every rank (gloo names a missing one), then destroy it."""
    if not dist.is_initialized():
        return
    with peer_errors(ctx, "waiting for all ranks to finish"):
        if ctx.process_group == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=ctx.timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    dist.destroy_process_group()


# -- one machine, from Python --------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free right now on this machine (each concurrent launch needs its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    """What one rank of ``spawn_local`` returned (``value``) or raised (``error``: type, message and trace)."""

    rank: int
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0          # from the rank's start to its result or error
    finished_at: float = 0.0      # wall-clock time (time.time()) of the result or error

    @property
    def ok(self) -> bool:
        return self.error is None


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, process_group: str | None, timeout_s: float,
           threads: int, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    t0 = time.perf_counter()
    try:
        ctx = init_distributed(process_group, timeout_s=timeout_s, threads=threads)
        with fail_together(ctx):
            value = fn(ctx, *args)
            shutdown(ctx)
        result = RankResult(rank, value=value)
    except BaseException as e:
        result = RankResult(rank, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                            error_type=type(e).__name__)
    result.seconds, result.finished_at = time.perf_counter() - t0, time.time()
    # Plain pickle bytes: tensors sent through a torch queue live in shared memory that vanishes with this process.
    results.put(pickle.dumps(result))


def spawn_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, process_group: str | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1, deadline_s: float | None = None,
                grace_s: float = 10.0) -> list[RankResult]:
    """Run ``fn(ctx, *args)`` on ``world_size`` new processes of this machine, one per rank, and collect each
    rank's return value or error. ``fn`` must be importable by name (a module-level function).

    The ranks fail together (see ``fail_together``); should a rank still be running ``grace_s`` seconds after
    another failed, or past ``deadline_s`` in all, it is terminated and reported as such.
    """
    mp = torch.multiprocessing.get_context("spawn")
    results = mp.Queue()
    port = free_port()
    procs = [mp.Process(target=_child, args=(fn, r, world_size, port, process_group, timeout_s, threads, args, results),
                        daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, RankResult] = {}
    start = time.monotonic()
    first_failure: float | None = None
    while len(out) < world_size:
        now = time.monotonic()
        if deadline_s is not None and now - start > deadline_s:
            break
        if first_failure is not None and now - first_failure > grace_s:
            break
        try:
            r: RankResult = pickle.loads(results.get(timeout=0.2))
            out[r.rank] = r
            if not r.ok and first_failure is None:
                first_failure = time.monotonic()
        except queue_mod.Empty:
            for rank, p in enumerate(procs):   # died without a word (a signal, or the process group aborted it)
                if rank not in out and p.exitcode is not None and p.exitcode != 0:
                    time.sleep(0.2)            # its message may still be in the queue
                    if rank not in out:
                        out[rank] = RankResult(rank, error=f"process exited with code {p.exitcode}",
                                               error_type="exit", seconds=time.monotonic() - start,
                                               finished_at=time.time())
                        first_failure = first_failure or time.monotonic()
    for rank, p in enumerate(procs):
        if rank not in out:
            out[rank] = RankResult(rank, error="still running: terminated by spawn_local", error_type="hang",
                                   seconds=time.monotonic() - start, finished_at=time.time())
        p.join(timeout=2.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
    return [out[r] for r in range(world_size)]
