"""``sirocco train --pipeline-ranks N`` under torchrun: the train verb with the model's layers split over N ranks.

    torchrun --nproc-per-node 2 -m sirocco.cli train --pipeline-ranks 2 --recipe sirocco-tiny --out runs/pp

The same recipe gives the same run as one process: every rank reads the corpus and packs the same batches
(seeded), rank 0 trains the tokenizer when the recipe needs one and the others read its file, each rank builds
or loads only its stage. A step's ``accum`` micro-batches of ``batch_rows`` rows go through the pipeline
schedule (GPipe, or 1F1B) as its micro-batches, so the accumulated gradients are those of the single-process
step; clipping uses the norm over all stages; each rank's AdamW updates its own parameters with the same
learning-rate schedule. Validation runs the stages forward only. Checkpoints are the files one process writes
for the model (``params.json`` + ``consolidated.safetensors``), gathered and written by rank 0, with the
recipe, the tokenizer and the loss curve beside them. Not (yet) in a pipeline: --resume (optimizer state is
per rank) and bf16 autocast (the stages run in fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import save_consolidated
from ..errors import SiroccoError
from ..model import Transformer
from ..tokenizer import load_tokenizer
from ..train.corpus import load_corpus
from ..train.data import Batch, DataPosition, PackedStream, eval_batches, tokenize
from ..train.losses import cross_entropy_sum, document_lengths
from ..train.loop import use_autocast
from ..train.plot import plot_losses
from ..train.recipe import Recipe
from ..train.run import open_run_tokenizer, unigram_entropy
from ..train.schedule import build_optimizer, learning_rate, set_learning_rate
from ..train.state import RECIPE, is_training_folder
from .run import on_ranks
from .launch import DistContext, agree, peer_errors
from .pipeline_train import PipelineTrainer, gather_state_dict
from .stages import rank_stage

log = logging.getLogger(__name__)


def step_batch(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's micro-batches as one (accum * rows, T) batch: tokens, targets, positions."""
    return (torch.cat([b.tokens for b in batches]), torch.cat([b.targets for b in batches]),
            torch.cat([b.positions for b in batches]))


@torch.no_grad()
def evaluate(stage: Transformer, ctx: DistContext, batches: list[Batch]) -> float:
    """Cross-entropy per target token over ``batches``, the stages run forward only (activations sent rank to
    rank); the same value on every rank (nan without batches)."""
    if not batches:
        return math.nan
    stage.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        plan = stage.plan(document_lengths(b.positions))
        n = b.tokens.numel()
        with peer_errors(ctx, "passing validation activations"):
            if ctx.is_first:
                x = b.tokens.flatten().to(ctx.device)
            else:
                x = torch.empty(n, stage.args.dim, device=ctx.device)
                dist.recv(x, src=ctx.rank - 1)
            h = stage(x, plan)
            if not ctx.is_last:
                dist.send(h.float().contiguous(), dst=ctx.rank + 1)
        if ctx.is_last:
            total[0] += float(cross_entropy_sum(h, b.targets.flatten().to(ctx.device)))
            total[1] += b.num_targets
    with peer_errors(ctx, "summing the validation loss"):
        dist.broadcast(total, src=ctx.world_size - 1)
    stage.train()
    return float(total[0] / max(1.0, float(total[1])))


def run_pipeline_training(args: argparse.Namespace, recipe: Recipe) -> int:
    """The train verb on a pipeline of ``args.pipeline_ranks`` processes (this is one of them)."""
    def work(ctx: DistContext) -> int:
        agree(ctx, "recipe", recipe.to_toml())
        summary = _train(args, recipe, ctx)
        if ctx.rank == 0:
            val = "none" if summary["val_loss"] is None else f"{summary['val_loss']:.3f}"
            print(json.dumps(summary) if args.json else
                  f"trained {summary['steps']} steps over {ctx.world_size} pipeline ranks in "
                  f"{summary['train_seconds'] / 60:.1f} min ({summary['tokens_per_s']:.0f} tokens/s): train loss "
                  f"{summary['train_loss']:.3f}, validation loss {val}\ncheckpoint: {summary['out']} (loss curve: "
                  f"{summary['out']}/loss.png)", file=sys.stdout if args.json else sys.stderr)
        return 0
    return on_ranks(args, work)


def _train(args: argparse.Namespace, recipe: Recipe, ctx: DistContext) -> dict[str, Any]:
    if args.resume:
        raise SiroccoError("--resume is not available with --pipeline-ranks yet (the optimizer state is per "
                           "rank); resume in one process, or start a new run")
    out = Path(args.out)
    if is_training_folder(out) or (out / "params.json").exists():
        raise SiroccoError(f"{out} already holds a training run; choose another --out")
    d, r = recipe.data, recipe.train
    if use_autocast(r.autocast, ctx.device):
        log.warning("bf16 autocast is not used in a pipeline: the stages train in fp32")
    corpus = load_corpus(d.corpus, d.val_fraction, d.min_chars)
    init = Path(args.init) if args.init else None
    tokenizer = tok_path = None
    if ctx.rank == 0:                      # may train a tokenizer into out: once, then the others read it
        out.mkdir(parents=True, exist_ok=True)
        tokenizer, tok_path = open_run_tokenizer(recipe, out, corpus, init, resume=False)
    with peer_errors(ctx, "waiting for rank 0's tokenizer"):
        paths = [str(tok_path) if tok_path else None]
        dist.broadcast_object_list(paths, src=0)
    if ctx.rank != 0:
        tok_path = Path(paths[0])
        tokenizer = load_tokenizer(tok_path)
    train_docs = tokenize([doc.text for doc in corpus.train], tokenizer)
    val_docs = tokenize([doc.text for doc in corpus.val], tokenizer)

    torch.manual_seed(recipe.seed)
    stage = rank_stage(ctx, init if init is not None else recipe.model_args(tokenizer.vocab_size),
                       seed=recipe.seed)
    margs = stage.args
    if d.seq_len > margs.max_seq_len:
        raise SiroccoError(f"[data] seq_len {d.seq_len} is longer than the model's max_seq_len {margs.max_seq_len}")
    stage.train()
    for p in stage.parameters():
        p.requires_grad_(True)
    stream = PackedStream(train_docs, d.seq_len, r.batch_rows, recipe.seed)
    val = eval_batches(val_docs, d.seq_len, r.batch_rows, r.eval_rows or None)
    trainer = PipelineTrainer(stage, ctx, n_microbatches=r.accum, schedule=args.pipeline_schedule,
                              aux_loss_coef=r.aux_loss_coef)
    optimizer = build_optimizer(stage.parameters(), r.lr, r.weight_decay, (r.beta1, r.beta2))
    baseline = unigram_entropy(train_docs)
    history: dict[str, list] = {"train": [], "val": [], "aux": []}

    def checkpoint() -> None:
        full = gather_state_dict(stage, ctx)
        if full is not None:
            save_consolidated(full, margs, out)
            (out / RECIPE).write_text(recipe.to_toml())
            if tok_path is not None and tok_path.resolve() != (out / tok_path.name).resolve():
                shutil.copyfile(tok_path, out / tok_path.name)
            plot_losses(history["train"], history["val"], out / "loss.png", title=out.name, baseline=baseline)
            if args.export:
                save_consolidated(full, margs, args.export, dtype=getattr(torch, args.export_dtype))
                if tok_path is not None:
                    shutil.copyfile(tok_path, Path(args.export) / tok_path.name)
        with peer_errors(ctx, "waiting for rank 0 to write the checkpoint"):
            dist.barrier()

    t0 = time.perf_counter()
    position, step, val_loss, tokens_run = DataPosition(), 0, math.nan, 0
    last_step = r.steps if args.stop_at is None else min(args.stop_at, r.steps)
    bar = tqdm(total=last_step, desc=f"training {out.name} ({ctx.world_size} ranks)", unit="step",
               file=sys.stderr, disable=True if ctx.rank != 0 or args.no_progress else None, dynamic_ncols=True)
    while step < last_step:
        batches = []
        for _ in range(r.accum):
            batch, position = stream.next(position)
            batches.append(batch)
        loss = trainer.step(*step_batch(batches))
        if r.clip > 0:
            trainer.clip_grad_norm_(r.clip)
        set_learning_rate(optimizer, learning_rate(step, r.lr, r.warmup, r.steps, r.min_lr))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_run += sum(b.num_tokens for b in batches)
        history["train"].append([step, trainer.last_ce])
        if trainer.last_aux:
            history["aux"].append([step, trainer.last_aux])
        if val and (step % r.eval_every == 0 or step == last_step):
            val_loss = evaluate(stage, ctx, val)
            history["val"].append([step, val_loss])
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}", refresh=False)
        bar.update(1)
        if (r.save_every and step % r.save_every == 0) or step == last_step:
            checkpoint()
    bar.close()
    seconds = time.perf_counter() - t0
    last = history["train"][-10:]
    return {"out": str(out), "steps": step, "pipeline_ranks": ctx.world_size,
            "train_loss": sum(x[1] for x in last) / len(last) if last else None,
            "val_loss": None if math.isnan(val_loss) else val_loss, "unigram_entropy": baseline,
            "tokens_per_s": tokens_run / seconds if seconds else 0.0, "train_seconds": seconds,
            "history": history, "export": args.export}
