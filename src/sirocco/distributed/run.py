"""A verb's work on every rank of a pipeline started by torchrun: joining the group, agreeing on the options,
sharing rank 0's inputs, loading this rank's stage, and failing together.

    torchrun --nproc-per-node 2 -m sirocco.cli generate --pipeline-ranks 2 --model ./mixtral "Hello"

Every rank reads the same options; rank 0 reads the inputs (prompts from the arguments, a file or standard
input) and shares them; every rank loads only its stage; rank 0 prints.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import backends
from ..errors import SiroccoError
from ..model import Transformer
from ..model.attention import Prefill
from ..pretrained import DEMO, load, model_folder
from ..tokenizer import Tokenizer, load_tokenizer
from .launch import (
    DistContext,
    DistributedError,
    agree,
    fail_together,
    fingerprint,
    init_distributed,
    peer_errors,
    shutdown,
)
from .stages import rank_stage, stage_from_state_dict, stage_spec

log = logging.getLogger(__name__)


def shared_from_rank0(ctx: DistContext, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 and give its result, or its ``SiroccoError``, to every rank (so an input error
    fails every rank with the same message)."""
    box: list[Any] = [None]
    if ctx.rank == 0:
        try:
            box[0] = ("ok", fn())
        except SiroccoError as e:
            box[0] = ("error", str(e))
    with peer_errors(ctx, f"sharing the {what}"):
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise SiroccoError(value)
    return value


def load_rank_stage(model: str | None, ctx: DistContext, dtype: torch.dtype, quantize: str | None = None,
                    backend: str | None = "torch", prefill: Prefill = "per_sequence"
                    ) -> tuple[Transformer, Tokenizer, str]:
    """This rank's stage of the model that ``model`` names (as ``--model``: a folder, a bundled name, None for
    the default) and the tokenizer, after every rank agreed on what it is loading, put on ``backend`` with the
    pre-fill path ``prefill`` (``backends.attach``); its linear layers quantized (int8 / int4, as ``--quantize``)
    where ``quantize`` says, each weight as it is read from a folder."""
    if model == DEMO:
        loaded = load(model, dtype=torch.float32, device="cpu", backend="torch")   # small: built whole, then cut
        margs = loaded.model.args
        agree(ctx, "model to load (the random demo model)", fingerprint(margs.to_dict(), DEMO, str(dtype)))
        spec = stage_spec(margs, ctx.world_size, ctx.rank)
        stage = stage_from_state_dict(margs, spec, loaded.model.state_dict(), dtype=dtype, device=ctx.device)
        backends.attach(stage, backend, quantize=quantize, prefill=prefill)
        return stage, loaded.tokenizer, f"{loaded.source}, {spec.describe()}"
    path = model_folder(model)
    if path.is_file():
        raise SiroccoError(f"--model {path}: pipeline ranks load checkpoint folders; a GGUF file runs in one process "
                           "(drop --pipeline-ranks)")
    stage = rank_stage(ctx, path, dtype=dtype, quantize=quantize, backend=backend, prefill=prefill)
    return stage, load_tokenizer(path), f"{path} ({dtype}, {ctx.device})"


def on_ranks(args: argparse.Namespace, work: Callable[[DistContext], int]) -> int:
    """Run a verb's ``work`` on this rank of a pipeline of ``args.pipeline_ranks`` processes: join the group,
    check that torchrun started that many, agree on the command-line options, and fail together. A
    ``SiroccoError`` fails every rank; rank 0 alone lets the CLI print it, the others only log it."""
    ctx = init_distributed(args.dist_backend, timeout_s=args.dist_timeout, threads=args.threads)
    try:
        with fail_together(ctx):
            if ctx.world_size != args.pipeline_ranks:
                raise DistributedError(f"--pipeline-ranks {args.pipeline_ranks} but torchrun started "
                                       f"{ctx.world_size} processes; use torchrun --nproc-per-node "
                                       f"{args.pipeline_ranks} (times the number of nodes)")
            agree(ctx, "command-line options", {k: v for k, v in sorted(vars(args).items()) if k != "prompts"
                                                and not k.startswith("_")})
            code = work(ctx)
            shutdown(ctx)
            return code
    except SiroccoError as e:
        if ctx.rank == 0:
            raise
        log.error("rank %d: %s", ctx.rank, e)
        return 1
