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
from ..model import Transformer, build_model
from ..tokenizer import load_tokenizer
from .corpus import Corpus, load_corpus
from .data import DataPosition, PackedStream, eval_batches, tokenize
from .loop import Trainer
from .plot import plot_losses
from .recipe import Recipe
from .tokenizer import tokenizer_file, train_tokenizer
from .state import RECIPE, is_training_folder, load_optimizer, read_state, save_training

log = logging.getLogger(__name__)


def unigram_entropy(docs: list[list[int]]) -> float:
    """Entropy (nats) of the unigram distribution of the tokens that are predicted (all but each BOS): the loss
    of the best model that ignores context."""
    counts = Counter(t for d in docs for t in d[1:])
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def corpus_digest(docs: list[list[int]]) -> str:
    """A short fingerprint of the tokenized training documents, to notice a corpus that changed on resume."""
    h = hashlib.sha256()
    for d in docs:
        h.update(torch.tensor(d, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


def open_run_tokenizer(recipe: Recipe, out: Path, corpus: Corpus, init: Optional[Path], resume: bool
                       ) -> tuple[Any, Path]:
    """The run's tokenizer and its file: the resumed run's, the fine-tuned checkpoint's, the recipe's, or a
    new one trained on the training documents (written into ``out``)."""
    if resume:
        source = out
    elif init is not None:
        source = init
    elif recipe.tokenizer.path:
        source = Path(recipe.tokenizer.path).expanduser()
    else:
        source = train_tokenizer([d.text for d in corpus.train], recipe.tokenizer.vocab_size,
                                 out / "tokenizer.model")
    return load_tokenizer(source), tokenizer_file(source)


def open_run_model(recipe: Recipe, out: Path, vocab_size: int, init: Optional[Path], resume: bool,
                   device: torch.device) -> Transformer:
    """The fp32 model to train: the resumed run's, the fine-tuned checkpoint's, or new weights drawn with the
    recipe's seed."""
    if resume or init is not None:
        model = load_model(out if resume else init, dtype=torch.float32, device=device)
        if init is not None and not resume:
            log.info("fine-tuning %s (all parameters); the recipe's [model] section is not used", init)
    else:
        model = build_model(recipe.model_args(vocab_size), dtype=torch.float32, device=device, seed=recipe.seed)
    if vocab_size > model.args.vocab_size:
        raise SiroccoError(f"the tokenizer has {vocab_size} pieces but the model's vocab_size is "
                           f"{model.args.vocab_size}")
    if recipe.data.seq_len > model.args.max_seq_len:
        raise SiroccoError(f"[data] seq_len {recipe.data.seq_len} is longer than the model's max_seq_len "
                           f"{model.args.max_seq_len}")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def export_model(model: Transformer, tokenizer: Optional[Path], folder: str | Path, dtype: torch.dtype) -> None:
    """The model alone (no training state) in ``dtype``, with its tokenizer: a folder to ship."""
    save_consolidated(model, model.args, folder, dtype=dtype)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(folder) / tokenizer.name)
    log.info("exported the model in %s to %s", str(dtype).removeprefix("torch."), folder)


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
    out, device = Path(out), torch.device(device)
    init = None if init is None else Path(init)
    t_start = time.perf_counter()
    state: dict[str, Any] = read_state(out) if resume else {}
    if not resume and is_training_folder(out):
        raise SiroccoError(f"{out} already holds a training run; pass --resume to continue it, or choose "
                           f"another --out")
    out.mkdir(parents=True, exist_ok=True)

    d, r = recipe.data, recipe.train
    if corpus is None:
        corpus = load_corpus(d.corpus, d.val_fraction, d.min_chars)
    tok_path: Optional[Path] = None
    if tokenizer is None:
        tokenizer, tok_path = open_run_tokenizer(recipe, out, corpus, init, resume)
    train_docs = tokenize([doc.text for doc in corpus.train], tokenizer)
    val_docs = tokenize([doc.text for doc in corpus.val], tokenizer)
    digest = corpus_digest(train_docs)
    if resume and state.get("corpus_digest") not in (None, digest):
        log.warning("the tokenized training corpus differs from the one this run started with (digest %s, "
                    "now %s): the run will not continue exactly", state["corpus_digest"], digest)

    torch.manual_seed(recipe.seed)
    model = open_run_model(recipe, out, tokenizer.vocab_size, init, resume, device)
    stream = PackedStream(train_docs, d.seq_len, r.batch_rows, recipe.seed)
    val = eval_batches(val_docs, d.seq_len, r.batch_rows, r.eval_rows or None)
    trainer = Trainer(model, r, stream, val)
    history: dict[str, list] = {"train": [], "val": [], "aux": []}
    elapsed0 = 0.0
    if resume:
        load_optimizer(out, trainer.optimizer)
        trainer.step, trainer.position = int(state["step"]), DataPosition(**state["data"])
        history, elapsed0 = state["history"], float(state.get("elapsed_s", 0.0))
        log.info("resumed %s at step %d (epoch %d, row %d)", out, trainer.step, trainer.position.epoch,
                 trainer.position.row)
    if not val:
        log.warning("no validation documents (val_fraction %g of %d documents): no validation loss",
                    d.val_fraction, len(corpus.train))
    baseline = unigram_entropy(train_docs)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters (%s); %d training tokens per epoch; %d steps of %d x %d x %d tokens; "
             "unigram entropy %.3f nats", n_params / 1e6, "MoE" if model.args.moe else "dense",
             stream.tokens_per_epoch(), r.steps, r.accum, r.batch_rows, d.seq_len, baseline)

    def checkpoint() -> None:
        st = {"step": trainer.step, "data": trainer.position.to_dict(), "history": history,
              "elapsed_s": elapsed0 + time.perf_counter() - t_start, "corpus_digest": digest, "seed": recipe.seed}
        save_training(out, model, model.args, trainer.optimizer, st, recipe.to_toml(), tok_path)
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
        tps = tokens_run / (time.perf_counter() - t_loop)
        history["train"].append([res.step, res.loss])
        if res.aux:
            history["aux"].append([res.step, res.aux])
        if val and (res.step % r.eval_every == 0 or res.step == r.steps):
            val_loss = trainer.evaluate()
            history["val"].append([res.step, val_loss])
            # without a progress bar (output to a file), the evaluations are the progress report
            log.log(logging.INFO if bar.disable else logging.DEBUG,
                    "step %d/%d: train loss %.3f, validation loss %.3f, %.0f tokens/s", res.step, r.steps,
                    res.loss, val_loss, tps)
        elif val and res.step == last_step:          # stopping early: for the summary, not the history
            val_loss = trainer.evaluate()
        bar.set_postfix(loss=f"{res.loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        if (r.save_every and res.step % r.save_every == 0) or res.step == last_step:
            checkpoint()
    bar.close()
    if not history["train"]:
        checkpoint()
    loop_s = time.perf_counter() - t_loop
    if export is not None:
        export_model(model, tok_path, export, export_dtype)

    last = history["train"][-10:]
    at = trainer.position
    summary = {
        "out": str(out), "steps": trainer.step, "parameters": n_params, "moe": model.args.moe is not None,
        "train_loss": sum(x[1] for x in last) / len(last) if last else math.nan,
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
        "unigram_entropy": baseline, "tokens_per_s": tokens_run / loop_s if tokens_run else 0.0,
        "train_seconds": elapsed0 + time.perf_counter() - t_start,
        "epochs": at.epoch + at.row / max(1, stream.rows_in_epoch(at.epoch)),
        "export": None if export is None else str(export), "recipe": str(out / RECIPE),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
