"""Serving over pipeline ranks: rank 0 answers HTTP, every rank runs the same engine loop on its stage.

    rank 0: HTTP -> inbox -> engine thread: commands ----broadcast----> rank r: commands
                                            apply, step                          apply, step (events dropped)

Each iteration of the loop (``Runner._serve``), rank 0's engine thread takes the commands waiting in its inbox
(adds with their request id, prompt ids and sampling params; aborts; stop) and broadcasts them; every rank
then applies the same list in the same order and steps when its engine has work, so every rank's engine
admits, schedules, compacts rows, stops and aborts alike, and each step's plan is the same everywhere (see
``distributed.executor``). A busy step costs one broadcast of 8 bytes (the payload's size: 0 when there is no
command) and, when there are commands, one more of their pickled bytes.

An idle rank 0 waits for a command at most ``heartbeat_s`` (1 s, or a quarter of the process group's timeout
if that is shorter) and then broadcasts anyway, possibly an empty list: the other ranks wait inside that
broadcast, and without the heartbeat an idle server would run into their timeout.
"""

from __future__ import annotations

import pickle
from typing import Optional

import torch
import torch.distributed as dist

from ..distributed.launch import DistContext, abort, peer_errors
from .runner import Command

HEARTBEAT_S = 1.0


class PipelineChannel:
    """The ``Channel`` of a pipeline's ranks (see ``runner.Channel``): rank 0 leads, the others follow."""

    def __init__(self, ctx: DistContext, heartbeat_s: float = HEARTBEAT_S):
        self.ctx = ctx
        self.leader = ctx.rank == 0
        self.heartbeat_s: Optional[float] = min(heartbeat_s, ctx.timeout_s / 4)
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
