"""``sirocco train``: train a model from scratch, fine-tune a checkpoint, or resume a run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

import torch

from ..train.recipe import RECIPES, SEED_LIMIT, Recipe
from ..train.tokenizer import MIN_VOCAB_SIZE
from .options import (
    DTYPES,
    add_machine_arguments,
    add_pipeline_arguments,
    add_progress_argument,
    int_at_least,
    int_in,
    positive_float,
    positive_int,
    resolve_device,
)

if TYPE_CHECKING:
    from ..train.run import Place

log = logging.getLogger(__name__)

DESCRIPTION = """Train a Mistral or Mixtral model by next-token prediction on packed documents (several
documents per row, attention block-diagonal causal and windowed, no padding): AdamW with warm-up and cosine
decay, gradient accumulation and clipping, the load-balancing loss for mixtures of experts, periodic validation,
checkpoints that resume exactly, and a loss curve (loss.png) next to the checkpoint.

A run is a recipe (a TOML file, or a bundled one by name) with flags on top; the same recipe and seed give the
same run. Without --tokenizer or [tokenizer] path, a sentencepiece BPE tokenizer is trained on the corpus
first. The default corpus is the Python documentation that ships with Python (no download).
Bundled recipes: %s."""

EXAMPLES = """examples:
  sirocco train --recipe sirocco-tiny --out runs/tiny                 # a bundled model's recipe
  sirocco train --out runs/quick --steps 200 --set model.preset=tiny   # the defaults, a tiny model
  sirocco train --recipe my.toml --corpus ./notes --out runs/notes     # a folder of text files (or a .jsonl)
  sirocco train --init ./mistral-7b --corpus data.jsonl --lr 1e-5 --steps 100 --out runs/ft   # fine-tune
  sirocco train --out runs/tiny --resume                               # continue where it stopped
  torchrun --nproc-per-node 2 -m sirocco.cli train --pipeline-ranks 2 --recipe sirocco-tiny --out runs/pp
                                                # the layers split over 2 processes (GPipe micro-batches)
  sirocco generate --model runs/tiny "The sliding window"              # use the result"""


def configure(p: argparse.ArgumentParser) -> None:
    names = ", ".join(sorted(x.stem for x in RECIPES.glob("*.toml"))) or "none"
    p.description = DESCRIPTION % names
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--recipe", metavar="PATH|NAME", help="a recipe TOML file or a bundled recipe's name "
                   "(default: every field at its default)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder of the run: the checkpoint (a model folder any verb loads), recipe.toml, loss.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", metavar="PATH", help="fine-tune this checkpoint (consolidated or Hugging Face "
                   "format) with its own tokenizer: all parameters train; [model] is not used")
    p.add_argument("--stop-at", type=positive_int, metavar="STEP", help="stop after this step with a checkpoint (the "
                   "schedule still spans all steps); continue later with --resume")
    p.add_argument("--export", metavar="DIR", help="also write the final model and tokenizer there, without "
                   "training state, in --export-dtype (how the bundled models were made)")
    p.add_argument("--export-dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the exported weights (default bfloat16: half the size)")
    r = p.add_argument_group("recipe fields (override the recipe)")
    r.add_argument("--seed", type=int_in(-SEED_LIMIT, SEED_LIMIT),
                   help="seed of the initial weights and of the data order, in [-2**42, 2**42]")
    r.add_argument("--corpus", help="'default', a folder of text files or a .jsonl file ([data] corpus)")
    r.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.model or a folder with one ([tokenizer] path)")
    r.add_argument("--vocab-size", type=int_at_least(MIN_VOCAB_SIZE),
                   help=f"pieces of the tokenizer trained on the corpus, at least {MIN_VOCAB_SIZE} "
                        "([tokenizer] vocab_size)")
    r.add_argument("--seq-len", type=int_at_least(2), help="tokens per training row, at least 2 ([data] seq_len)")
    r.add_argument("--steps", type=positive_int, help="optimizer steps, at least 1 ([train] steps)")
    r.add_argument("--batch-rows", type=positive_int, help="rows per micro-batch, at least 1 ([train] batch_rows)")
    r.add_argument("--accum", type=positive_int,
                   help="micro-batches per step, gradient accumulation, at least 1 ([train] accum)")
    r.add_argument("--lr", type=positive_float, help="peak learning rate, > 0 ([train] lr)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any recipe field, e.g. --set train.warmup=50 --set model.sliding_window=64 (repeatable)")
    h = p.add_argument_group("machine and output")
    add_machine_arguments(h)
    add_progress_argument(h)
    h.add_argument("--json", action="store_true", help="print the summary as one JSON object on standard output")
    add_pipeline_arguments(p, training=True)


FLAG_FIELDS = {"corpus": ("data", "corpus"), "tokenizer": ("tokenizer", "path"),
               "vocab_size": ("tokenizer", "vocab_size"), "seq_len": ("data", "seq_len"),
               "steps": ("train", "steps"), "batch_rows": ("train", "batch_rows"), "accum": ("train", "accum"),
               "lr": ("train", "lr")}


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file (or the resumed run's), then --set, then the named flags; checked once at the end."""
    from pathlib import Path
    if args.recipe:
        recipe = Recipe.load(args.recipe)
    elif args.resume and (Path(args.out) / "recipe.toml").is_file():
        recipe = Recipe.load(str(Path(args.out) / "recipe.toml"))
    else:
        recipe = Recipe()
    for assignment in args.set:
        recipe.override(assignment)
    for flag, (section, name) in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            recipe.set(section, name, value, f"--{flag.replace('_', '-')}")
    if args.seed is not None:
        recipe.seed = args.seed
    recipe.validate("the recipe with its flags")
    return recipe


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    if args.pipeline_ranks > 1:
        from ..distributed.pipeline_train import PipelinePlace
        from ..distributed.run import on_ranks
        return on_ranks(args, lambda ctx: train_and_report(args, recipe,
                                                           PipelinePlace(ctx, recipe, args.pipeline_schedule)))
    from ..train.run import LocalPlace
    return train_and_report(args, recipe, LocalPlace(resolve_device(args.device)))


def train_and_report(args: argparse.Namespace, recipe: Recipe, place: Place) -> int:
    """Train ``recipe`` as the command line says, on ``place``; the reporter prints the summary."""
    from ..train.run import train
    summary = train(recipe, args.out, init=args.init, resume=args.resume, export=args.export,
                    export_dtype=DTYPES[args.export_dtype], progress=False if args.no_progress else None,
                    stop_at=args.stop_at, place=place)
    if not place.is_reporter:
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    where = f" over {summary['pipeline_ranks']} pipeline ranks" if summary.get("pipeline_ranks") else ""
    val = (f", validation loss {summary['val_loss']:.3f} (perplexity {summary['val_perplexity']:.1f})"
           if summary["val_loss"] is not None else ", no validation documents")
    print(f"trained {summary['steps']} steps{where} in {summary['train_seconds'] / 60:.1f} min "
          f"({summary['tokens_per_s']:.0f} tokens/s, {summary['epochs']:.2f} epochs): train loss "
          f"{summary['train_loss']:.3f}" + val
          + f"; unigram entropy {summary['unigram_entropy']:.3f}\ncheckpoint: {summary['out']} "
          f"(loss curve: {summary['out']}/loss.png)" + (f"\nexported: {summary['export']}"
                                                       if summary["export"] else ""), file=sys.stderr)
    return 0
