"""A whole training run: corpus -> tokenizer -> model -> steps with validation and checkpoints -> summary.

    >>> from sirocco.train.recipe import Recipe
    >>> from sirocco.train.run import train
    >>> summary = train(Recipe.load("sirocco-tiny"), "runs/sirocco-tiny")           # doctest: +SKIP

Three ways to start: from scratch (the recipe's [model], weights drawn with its seed), from a checkpoint of
either published format (``init``: full fine-tuning, its own tokenizer and shapes), or from a training folder
(``resume``: exactly where it stopped).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from ..checkpoint import load_model, save_consolidated
from ..errors import SiroccoError
from ..model import build_model
from .corpus import Corpus, load_corpus
from .data import DataPosition, PackedStream, eval_batches, tokenize
from .loop import Trainer
from .plot import plot_losses
from .recipe import Recipe
from ..tokenizer import load_tokenizer
from .spm import tokenizer_file, train_tokenizer
from .state import RECIPE, is_training_folder, load_optimizer, read_state, save_training

log = logging.getLogger(__name__)


def unigram_entropy(docs: list[list[int]]) -> float:
    """Entropy (nats) of the unigram distribution of the tokens that are predicted (all but each BOS): the loss
    of the best model that ignores context."""
    counts = Counter(t for d in docs for t in d[1:])
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def corpus_digest(docs: list[list[int]]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(torch.tensor(d, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


def train(recipe: Recipe, out: str | Path, *, init: Optional[str | Path] = None, resume: bool = False,
          export: Optional[str | Path] = None, export_dtype: torch.dtype = torch.bfloat16,
          device: torch.device | str = "cpu", progress: Optional[bool] = None, stop_at: Optional[int] = None,
          corpus: Optional[Corpus] = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run ``recipe`` writing checkpoints into ``out``; returns the summary (also in ``--json``).

    Args:
        init: a checkpoint folder (consolidated or Hugging Face) to fine-tune; its tokenizer is used.
        resume: continue the training folder ``out`` (its recipe.toml, unless ``recipe`` is given anew).
        export: also write the final model (and tokenizer) there in ``export_dtype``, without training state.
        stop_at: stop after this step with a checkpoint, as if interrupted (the schedule is still the
            recipe's ``steps``); resume later.
        corpus, tokenizer: already loaded ones (tests); by default from the recipe.
    """
    out = Path(out)
    device = torch.device(device)
    t_start = time.perf_counter()
    state: dict[str, Any] = {}
    if resume:
        state = read_state(out)
    elif is_training_folder(out):
        raise SiroccoError(f"{out} already holds a training run; pass --resume to continue it, or choose "
                           f"another --out")
    out.mkdir(parents=True, exist_ok=True)

    # corpus and tokenizer
    if corpus is None:
        corpus = load_corpus(recipe.data.corpus, recipe.data.val_fraction, recipe.data.min_chars)
    tok_path: Optional[Path] = None
    if tokenizer is None:
        if resume:
            source = out
        elif init is not None:
            source = Path(init)
        elif recipe.tokenizer.path:
            source = Path(recipe.tokenizer.path).expanduser()
        else:
            source = train_tokenizer([d.text for d in corpus.train], recipe.tokenizer.vocab_size,
                                     out / "tokenizer.model")
        tokenizer = load_tokenizer(source)
        tok_path = tokenizer_file(source)
    train_docs = tokenize([d.text for d in corpus.train], tokenizer)
    val_docs = tokenize([d.text for d in corpus.val], tokenizer)
    digest = corpus_digest(train_docs)
    if resume and state.get("corpus_digest") not in (None, digest):
        log.warning("the tokenized training corpus differs from the one this run started with (digest %s, "
                    "now %s): the run will not continue exactly", state["corpus_digest"], digest)

    # model
    torch.manual_seed(recipe.seed)
    if resume or init is not None:
        model = load_model(out if resume else init, dtype=torch.float32, device=device)
        if init is not None and not resume:
            log.info("fine-tuning %s (all parameters); the recipe's [model] section is not used", init)
    else:
        model = build_model(recipe.model_args(tokenizer.vocab_size), dtype=torch.float32, device=device,
                            seed=recipe.seed)
    args = model.args
    if tokenizer.vocab_size > args.vocab_size:
        raise SiroccoError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                           f"{args.vocab_size}")
    if recipe.data.seq_len > args.max_seq_len:
        raise SiroccoError(f"[data] seq_len {recipe.data.seq_len} is longer than the model's max_seq_len "
                           f"{args.max_seq_len}")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    d, r = recipe.data, recipe.train
    stream = PackedStream(train_docs, d.seq_len, r.batch_rows, recipe.seed)
    val = eval_batches(val_docs, d.seq_len, r.batch_rows, r.eval_rows or None)
    trainer = Trainer(model, r, stream, val)
    history: dict[str, list] = {"train": [], "val": [], "aux": []}
    elapsed0 = 0.0
    if resume:
        load_optimizer(out, trainer.optimizer)
        trainer.step = int(state["step"])
        trainer.position = DataPosition(**state["data"])
        history = state["history"]
        elapsed0 = float(state.get("elapsed_s", 0.0))
        log.info("resumed %s at step %d (epoch %d, row %d)", out, trainer.step, trainer.position.epoch,
                 trainer.position.row)
    if not val:
        log.warning("no validation documents (val_fraction %g of %d documents): no validation loss",
                    d.val_fraction, len(corpus.train))
    baseline = unigram_entropy(train_docs)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters (%s); %d training tokens per epoch; %d steps of %d x %d x %d tokens; "
             "unigram entropy %.3f nats", n_params / 1e6, "MoE" if args.moe else "dense",
             stream.tokens_per_epoch(), r.steps, r.accum, r.batch_rows, d.seq_len, baseline)

    def checkpoint(elapsed: float) -> None:
        st = {"step": trainer.step, "data": trainer.position.to_dict(), "history": history,
              "elapsed_s": elapsed, "corpus_digest": digest, "seed": recipe.seed}
        save_training(out, model, args, trainer.optimizer, st, recipe.to_toml(), tok_path)
        plot_losses(history["train"], history["val"], out / "loss.png", title=out.name, baseline=baseline)

    bar = tqdm(total=r.steps, initial=trainer.step, desc=f"training {out.name}", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    t_loop = time.perf_counter()
    tokens_run = 0
    val_loss = history["val"][-1][1] if history["val"] else math.nan
    last_step = r.steps if stop_at is None else min(stop_at, r.steps)
    while trainer.step < last_step:
        res = trainer.train_step()
        tokens_run += res.tokens
        history["train"].append([res.step, res.loss])
        if res.aux:
            history["aux"].append([res.step, res.aux])
        if val and (res.step % r.eval_every == 0 or res.step == r.steps):
            val_loss = trainer.evaluate()
            history["val"].append([res.step, val_loss])
            # without a progress bar (output to a file), the evaluations are the progress report
            log.log(logging.INFO if bar.disable else logging.DEBUG,
                    "step %d/%d: train loss %.3f, validation loss %.3f, %.0f tokens/s", res.step, r.steps,
                    res.loss, val_loss, tokens_run / (time.perf_counter() - t_loop))
        elif val and res.step == last_step:          # stopping early: for the summary, not the history
            val_loss = trainer.evaluate()
        tps = tokens_run / (time.perf_counter() - t_loop)
        bar.set_postfix(loss=f"{res.loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        if (r.save_every and res.step % r.save_every == 0) or res.step == last_step:
            checkpoint(elapsed0 + time.perf_counter() - t_start)
    bar.close()
    if not history["train"]:
        checkpoint(elapsed0 + time.perf_counter() - t_start)
    loop_s = time.perf_counter() - t_loop
    elapsed = elapsed0 + time.perf_counter() - t_start
    if export is not None:
        save_consolidated(model, args, export, dtype=export_dtype)
        if tok_path is not None:
            shutil.copyfile(tok_path, Path(export) / tok_path.name)
        log.info("exported the model in %s to %s", str(export_dtype).removeprefix("torch."), export)
    last = history["train"][-10:]
    summary = {
        "out": str(out), "steps": trainer.step, "parameters": n_params, "moe": args.moe is not None,
        "train_loss": sum(x[1] for x in last) / len(last) if last else math.nan,
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
        "unigram_entropy": baseline, "tokens_per_s": tokens_run / loop_s if loop_s > 0 and tokens_run else 0.0,
        "train_seconds": elapsed, "epochs": trainer.position.epoch + trainer.position.row / max(1, stream.rows_in_epoch(
            trainer.position.epoch)),
        "export": None if export is None else str(export), "recipe": str(out / RECIPE),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
