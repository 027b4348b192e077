"""``sirocco generate --pipeline-ranks N`` under torchrun: the generate verb with the model split over N ranks.

    torchrun --nproc-per-node 2 -m sirocco.cli generate --pipeline-ranks 2 --model ./mixtral "Hello"

Every rank reads the same options; rank 0 reads the prompts (arguments, file or standard input) and shares
them; every rank loads only its stage; rank 0 prints. The generate verb calls ``add_pipeline_arguments`` in
its ``configure`` and hands over to ``run_pipeline`` when ``--pipeline-ranks`` is above 1.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import SiroccoError
from ..loading import DTYPES, DEMO, load, model_folder
from ..model import Transformer
from .launch import (DEFAULT_TIMEOUT_S, DistContext, DistributedError, agree, fail_together, fingerprint,
                     init_distributed, peer_errors, shutdown)
from .pipeline_engine import PipelineEngine
from .stages import parameter_bytes, rank_stage, stage_from_state_dict, stage_spec

log = logging.getLogger(__name__)


def add_pipeline_arguments(p: argparse.ArgumentParser, training: bool = False) -> None:
    """The pipeline options of the generate verb, or of the train verb with ``training``."""
    g = p.add_argument_group("pipeline parallelism (start with torchrun --nproc-per-node N)")
    g.add_argument("--pipeline-ranks", type=int, default=1, metavar="N",
                   help="split the model's layers into N stages, one per process started by torchrun "
                        "(default 1: no split)")
    if training:
        g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], default="gpipe",
                       help="order of the micro-batches' forwards and backwards (the recipe's accum "
                            "micro-batches of each step): gpipe, or 1f1b which holds fewer activations")
    else:
        g.add_argument("--micro-batches", type=int, default=None, metavar="M",
                       help="groups of sequences per step that flow through the stages at the same time "
                            "(default: N; 1 runs each step's batch whole)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="longest wait for another rank before failing (default %(default)s)")
    g.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                   help="process-group backend (default: nccl with CUDA, else gloo)")


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


def load_rank_stage(args: argparse.Namespace, ctx: DistContext, dtype: torch.dtype) -> tuple[Transformer, Any, str]:
    """This rank's stage and the tokenizer, after every rank agreed on what it is loading."""
    if args.model == DEMO:
        loaded = load(args.model, dtype=torch.float32, device="cpu")        # small: built whole, then cut
        margs = loaded.model.args
        agree(ctx, "model to load (the random demo model)", fingerprint(margs.to_dict(), DEMO, str(dtype)))
        spec = stage_spec(margs, ctx.world_size, ctx.rank)
        stage = stage_from_state_dict(margs, spec, loaded.model.state_dict(), dtype=dtype, device=ctx.device)
        return stage, loaded.tokenizer, f"{loaded.source}, {spec.describe()}"
    path = model_folder(args.model)          # a folder, a bundled model's name, or the default model
    stage = rank_stage(ctx, path, dtype=dtype)
    from ..tokenizer import load_tokenizer
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


def run_pipeline(args: argparse.Namespace) -> int:
    """The generate verb on a pipeline of ``args.pipeline_ranks`` processes (this is one of them)."""
    from ..generate import cli as generate_cli

    def work(ctx: DistContext) -> int:
        prompts = shared_from_rank0(ctx, lambda: generate_cli.read_prompts(args), "prompts")
        stage, tokenizer, source = load_rank_stage(args, ctx, DTYPES[args.dtype])
        log.info("rank %d: loaded %s, %.1f MiB of parameters", ctx.rank, source, parameter_bytes(stage) / 2**20)
        return _generate(args, ctx, stage, tokenizer, prompts)
    return on_ranks(args, work)


def _generate(args: argparse.Namespace, ctx: DistContext, stage: Transformer, tokenizer, prompts: list[str]) -> int:
    from ..generate.cli import cache_len, generate_and_print
    engine = PipelineEngine(stage, ctx, tokenizer, micro_batches=args.micro_batches, max_rows=args.max_rows,
                            chunk_size=args.chunk_size,
                            max_seq_len=cache_len(args, stage.args.max_seq_len, tokenizer, prompts),
                            backend=args.backend)
    return generate_and_print(args, engine, tokenizer, prompts, speak=ctx.rank == 0,
                              where=f" over {ctx.world_size} pipeline ranks")
