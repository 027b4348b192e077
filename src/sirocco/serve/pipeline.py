"""How each iteration's commands reach the engine loop of every rank: one process, or a pipeline whose rank 0
answers HTTP while every rank runs the same engine loop on its stage.

    rank 0: HTTP -> inbox -> engine thread: commands ----broadcast----> rank r: commands
                                            apply, step                          apply, step (events dropped)

A ``Command`` is an add (request id, prompt ids, sampling params), an abort or a stop. Each iteration of the loop
(``Runner._serve``), the leader's engine thread takes the commands waiting in its inbox and hands them to
``Channel.share``; every rank then applies the same list in the same order and steps when its engine has work,
so every rank's engine admits, schedules, compacts rows, stops and aborts alike, and each step's plan is the same
everywhere (see ``distributed.executor``). ``LocalChannel`` (one process) shares nothing. ``PipelineChannel``
broadcasts: a busy step costs one broadcast of 8 bytes (the payload's size: 0 when there is no command) and, when
there are commands, one more of their pickled bytes.

An idle rank 0 waits for a command at most ``heartbeat_s`` (1 s, or a quarter of the process group's timeout if
that is shorter) and then shares anyway, possibly an empty list: the other ranks wait inside that broadcast, and
without the heartbeat an idle server would run into their timeout.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..distributed.launch import DistContext, abort, peer_errors
from ..generate.sampling import SamplingParams

HEARTBEAT_S = 1.0


@dataclass
class Reply:
    """Where an add's acceptance and events go on rank 0; it never leaves the process."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float
    observer: Any = None        # the request's inside-panel observer (serve.inside.InsideRequest), if any


@dataclass
class Command:
    """One entry of the engine thread's inbox: ``add`` (rid, prompt ids, params), ``abort`` (rid) or ``stop``.
    Every rank applies the same commands in the same order; ``reply`` is rank 0's alone."""

    kind: str
    rid: str = ""
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    reply: Reply | None = field(default=None, compare=False)

    def shared(self) -> Command:
        """What the other ranks receive: the command without rank 0's reply."""
        return Command(self.kind, self.rid, self.prompt, self.params)


class Channel(Protocol):
    """How each iteration's commands reach every rank's engine.

    ``leader``: this rank collects the commands (rank 0) rather than receives them. ``heartbeat_s``: longest
    wait for a command while idle before ``share`` is called anyway (None: no limit), so the other ranks, which
    wait inside ``share``, never reach their timeout."""

    leader: bool
    heartbeat_s: float | None

    def share(self, cmds: list[Command]) -> list[Command]:
        """Called once per iteration on every rank: the leader's commands, on every rank."""
        ...

    def abort(self) -> None:
        """The loop failed here: make the other ranks fail now rather than at their timeout."""
        ...


class LocalChannel:
    """One process: nothing to share, and nobody waits for a heartbeat."""

    leader = True
    heartbeat_s: float | None = None

    def share(self, cmds: list[Command]) -> list[Command]:
        return cmds

    def abort(self) -> None:
        pass


class PipelineChannel:
    """The channel of a pipeline's ranks: rank 0 leads, the others follow."""

    def __init__(self, ctx: DistContext, heartbeat_s: float = HEARTBEAT_S):
        self.ctx = ctx
        self.leader = ctx.rank == 0
        self.heartbeat_s: float | None = min(heartbeat_s, ctx.timeout_s / 4)
        self._bound = False

    def share(self, cmds: list[Command]) -> list[Command]:
        ctx = self.ctx
        if not self._bound and ctx.device.type == "cuda":      # the engine thread's current device is its own
            torch.cuda.set_device(ctx.device)
        self._bound = True
        payload = pickle.dumps([c.shared() for c in cmds]) if self.leader and cmds else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=ctx.device)
        with peer_errors(ctx, "sharing the server's commands"):
            dist.broadcast(size, src=0)
            n = int(size.item())
            if n == 0:
                return cmds if self.leader else []
            if self.leader:
                data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(ctx.device)
            else:
                data = torch.empty(n, dtype=torch.uint8, device=ctx.device)
            dist.broadcast(data, src=0)
        if self.leader:
            return cmds
        received: list[Command] = pickle.loads(data.cpu().numpy().tobytes())
        return received

    def abort(self) -> None:
        """Tear this rank out of the process group: the others, waiting in a broadcast or a receive, fail now."""
        abort()
