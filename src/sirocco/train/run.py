"""A whole training run: corpus -> tokenizer -> model -> steps with validation and checkpoints -> summary, the
same loop in one process and on every rank of a pipeline (a ``Place`` builds the model's ``StepFunction``).

    >>> from sirocco.train.recipe import Recipe
    >>> from sirocco.train.run import train
    >>> summary = train(Recipe.load("sirocco-tiny"), "runs/sirocco-tiny")           # doctest: +SKIP

``train`` is three parts, each sharing the ``Run`` the first one opens:

    open_run    the folder, corpus, tokenizer, model and optimizer (and, resuming, where the run stopped)
    run_steps   the steps, with validation and checkpoints
    summarize   the summary ``sirocco train --json`` prints

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from tqdm import tqdm

from ..checkpoint import load_model, save_consolidated
from ..config import ModelArgs
from ..errors import SiroccoError
from ..model import Transformer, build_model
from ..tokenizer import load_tokenizer
from .corpus import Corpus, load_corpus
from .data import DataPosition, PackedStream, eval_batches, tokenize
from .loop import LocalStep, StepFunction, Trainer
from .plot import plot_losses
from .recipe import Recipe
from .state import RECIPE, is_training_folder, load_optimizer, read_state, save_training
from .tokenizer import tokenizer_file, train_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Place(Protocol):
    """Where a run's model trains: the whole model in this process (``LocalPlace``), or this rank's stage of a
    pipeline (``sirocco.distributed.pipeline_train.PipelinePlace``). ``train`` is the same for both."""

    is_reporter: bool               # shows the progress, logs the run, gets the checkpoint to write
    resume_refused: str | None   # why --resume cannot work here, or None
    label: str                      # added to the progress bar's description

    def shared(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` run by the reporter, its result on every rank."""

    def build(self, recipe: Recipe, out: Path, vocab_size: int, init: Path | None, resume: bool) -> StepFunction:
        """The step function of the model to train (see ``open_run_model``), in training mode."""

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here."""

    def summary(self, history: dict[str, list]) -> dict[str, Any]:
        """Fields added to the run's summary."""


class LocalPlace:
    """The whole model in this process, on ``device``."""

    is_reporter = True
    resume_refused: str | None = None
    label = ""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def shared(self, fn: Callable[[], T], what: str) -> T:
        return fn()

    def build(self, recipe: Recipe, out: Path, vocab_size: int, init: Path | None, resume: bool) -> LocalStep:
        return LocalStep(open_run_model(recipe, out, vocab_size, init, resume, self.device), recipe.train)

    def barrier(self, what: str) -> None:
        pass

    def summary(self, history: dict[str, list]) -> dict[str, Any]:
        return {}


@dataclass
class Run:
    """An opened run: what its steps, checkpoints and summary share (``open_run`` builds it)."""

    recipe: Recipe
    out: Path                           # the training folder
    place: Place
    step_fn: StepFunction
    trainer: Trainer
    tok_path: Path | None            # the tokenizer file copied into checkpoints (None: given in memory)
    digest: str                         # fingerprint of the tokenized training documents
    baseline: float                     # their unigram entropy (nats)
    n_params: int                       # parameters of the whole model
    t_start: float                      # time.perf_counter() when this process started the run
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "val": [], "aux": []})
    elapsed0: float = 0.0               # seconds spent before this process resumed the run

    @property
    def resumable(self) -> bool:
        return self.place.resume_refused is None

    def elapsed(self) -> float:
        """Seconds of training so far, over every process that ran it."""
        return self.elapsed0 + time.perf_counter() - self.t_start

    def checkpoint(self) -> None:
        """The reporter writes the model, the training state and the loss curve; every rank waits for it."""
        full = self.step_fn.full_state_dict()
        if full is not None:
            t = self.trainer
            state = {"step": t.step, "data": t.position.to_dict(), "history": self.history,
                     "elapsed_s": self.elapsed(), "corpus_digest": self.digest, "seed": self.recipe.seed}
            save_training(self.out, full, self.step_fn.args, t.optimizer if self.resumable else None, state,
                          self.recipe.to_toml(), self.tok_path)
            plot_losses(self.history["train"], self.history["val"], self.out / "loss.png", title=self.out.name,
                        baseline=self.baseline)
        self.place.barrier("waiting for rank 0 to write the checkpoint")

    def export(self, folder: str | Path, dtype: torch.dtype) -> None:
        """The reporter writes the model alone in ``dtype`` (``export_model``); every rank waits for it."""
        full = self.step_fn.full_state_dict()
        if full is not None:
            export_model(full, self.step_fn.args, self.tok_path, folder, dtype)
        self.place.barrier("waiting for rank 0 to export the model")


def train(recipe: Recipe, out: str | Path, *, init: str | Path | None = None, resume: bool = False,
          export: str | Path | None = None, export_dtype: torch.dtype = torch.bfloat16,
          device: torch.device | str = "cpu", progress: bool | None = None, stop_at: int | None = None,
          corpus: Corpus | None = None, tokenizer: Any = None, place: Place | None = None) -> dict[str, Any]:
    """Run ``recipe`` writing checkpoints into ``out``; returns the summary (also in ``--json``).

    Args:
        init: a checkpoint folder (consolidated or Hugging Face) to fine-tune; its tokenizer is used.
        resume: continue the training folder ``out`` (its recipe.toml, unless ``recipe`` is given anew).
        export: also write the final model (and tokenizer) there in ``export_dtype``, without training state.
        device: where the model trains when no ``place`` is given.
        progress: the progress bar (None: if standard error is a terminal).
        stop_at: stop after this step with a checkpoint, as if interrupted (the schedule is still the
            recipe's ``steps``); resume later.
        corpus, tokenizer: already loaded ones (tests); by default from the recipe.
        place: where the model trains: ``LocalPlace(device)`` by default, or a rank of a pipeline (every rank
            calls ``train`` with the same arguments).
    """
    t_start = time.perf_counter()
    run = open_run(recipe, Path(out), LocalPlace(device) if place is None else place,
                   init=None if init is None else Path(init), resume=resume, corpus=corpus, tokenizer=tokenizer,
                   t_start=t_start)
    totals = run_steps(run, stop_at=stop_at, progress=progress)
    if export is not None:
        run.export(export, export_dtype)
    return summarize(run, totals, export)


# -- opening the run ------------------------------------------------------------------------------------------
def open_run(recipe: Recipe, out: Path, place: Place, *, init: Path | None, resume: bool,
             corpus: Corpus | None, tokenizer: Any, t_start: float) -> Run:
    """Everything before the first step: the folder, the documents tokenized, the model on ``place`` with its
    optimizer and, on ``resume``, the step, data position, history and optimizer state where the run stopped."""
    state = claim_folder(out, resume, place)
    d, r = recipe.data, recipe.train
    if corpus is None:
        corpus = load_corpus(d.corpus, d.val_fraction, d.min_chars)
    tok_path: Path | None = None
    if tokenizer is None:
        tokenizer, tok_path = shared_tokenizer(recipe, out, corpus, init, resume, place)
    train_docs = tokenize([doc.text for doc in corpus.train], tokenizer)
    val_docs = tokenize([doc.text for doc in corpus.val], tokenizer)
    digest = corpus_digest(train_docs)
    if resume and state.get("corpus_digest") not in (None, digest):
        log.warning("the tokenized training corpus differs from the one this run started with (digest %s, "
                    "now %s): the run will not continue exactly", state["corpus_digest"], digest)

    torch.manual_seed(recipe.seed)
    step_fn = place.build(recipe, out, tokenizer.vocab_size, init, resume)
    check_model(step_fn.args, tokenizer.vocab_size, d.seq_len)
    stream = PackedStream(train_docs, d.seq_len, r.batch_rows, recipe.seed)
    trainer = Trainer(step_fn, r, stream, eval_batches(val_docs, d.seq_len, r.batch_rows, r.eval_rows or None))
    run = Run(recipe, out, place, step_fn, trainer, tok_path, digest, unigram_entropy(train_docs),
              step_fn.num_parameters(), t_start)
    if resume:
        load_optimizer(out, trainer.optimizer)
        trainer.step, trainer.position = int(state["step"]), DataPosition(**state["data"])
        run.history, run.elapsed0 = state["history"], float(state.get("elapsed_s", 0.0))
        log.info("resumed %s at step %d (epoch %d, row %d)", out, trainer.step, trainer.position.epoch,
                 trainer.position.row)
    if place.is_reporter:
        if not trainer.val:
            log.warning("no validation documents (val_fraction %g of %d documents): no validation loss",
                        d.val_fraction, len(corpus.train))
        log.info("model: %.2fM parameters (%s); %d training tokens per epoch; %d steps of %d x %d x %d tokens; "
                 "unigram entropy %.3f nats", run.n_params / 1e6, "MoE" if step_fn.args.moe else "dense",
                 stream.tokens_per_epoch(), r.steps, r.accum, r.batch_rows, d.seq_len, run.baseline)
    return run


def claim_folder(out: Path, resume: bool, place: Place) -> dict[str, Any]:
    """Check that ``out`` can take this run, and create it; the state of the run to resume ({} for a new one)."""
    if resume and place.resume_refused:
        raise SiroccoError(place.resume_refused)
    state: dict[str, Any] = read_state(out) if resume else {}
    resumable = place.resume_refused is None
    # a run that cannot be resumed does not write over a model either
    if not resume and (is_training_folder(out) or (not resumable and (out / "params.json").exists())):
        hint = "pass --resume to continue it, or choose another --out" if resumable else "choose another --out"
        raise SiroccoError(f"{out} already holds a training run; {hint}")
    out.mkdir(parents=True, exist_ok=True)
    return state


def shared_tokenizer(recipe: Recipe, out: Path, corpus: Corpus, init: Path | None, resume: bool,
                     place: Place) -> tuple[Any, Path]:
    """The run's tokenizer and its file (see ``open_run_tokenizer``), opened or trained into ``out`` by the
    reporter, then read from that file by the other ranks."""
    opened: list[Any] = []

    def open_tokenizer() -> str:
        tok, path = open_run_tokenizer(recipe, out, corpus, init, resume)
        opened.append(tok)
        return str(path)
    path = Path(place.shared(open_tokenizer, "tokenizer"))
    return (opened[0] if opened else load_tokenizer(path)), path


def open_run_tokenizer(recipe: Recipe, out: Path, corpus: Corpus, init: Path | None, resume: bool
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


def open_run_model(recipe: Recipe, out: Path, vocab_size: int, init: Path | None, resume: bool,
                   device: torch.device) -> Transformer:
    """The fp32 model to train: the resumed run's, the fine-tuned checkpoint's, or new weights drawn with the
    recipe's seed."""
    if resume or init is not None:
        model = load_model(out if resume or init is None else init, dtype=torch.float32, device=device)
        if init is not None and not resume:
            log.info("fine-tuning %s (all parameters); the recipe's [model] section is not used", init)
    else:
        model = build_model(recipe.model_args(vocab_size), dtype=torch.float32, device=device, seed=recipe.seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def check_model(args: ModelArgs, vocab_size: int, seq_len: int) -> None:
    """The model can take the tokenizer's ids and the recipe's rows."""
    if vocab_size > args.vocab_size:
        raise SiroccoError(f"the tokenizer has {vocab_size} pieces but the model's vocab_size is {args.vocab_size}")
    if seq_len > args.max_seq_len:
        raise SiroccoError(f"[data] seq_len {seq_len} is longer than the model's max_seq_len {args.max_seq_len}")


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


# -- the steps ------------------------------------------------------------------------------------------------
@dataclass
class LoopTotals:
    """What the steps of this process add up to."""

    tokens: int             # tokens run
    seconds: float          # wall time of the loop
    val_loss: float         # the last validation loss (nan without validation documents)


def run_steps(run: Run, stop_at: int | None = None, progress: bool | None = None) -> LoopTotals:
    """Steps up to the recipe's ``steps`` (or ``stop_at``): validation every ``eval_every`` steps and at the
    last, checkpoints every ``save_every`` steps and at the end, a progress bar on the reporter."""
    r, trainer, history, place = run.recipe.train, run.trainer, run.history, run.place
    bar = tqdm(total=r.steps, initial=trainer.step, desc=f"training {run.out.name}{place.label}", unit="step",
               file=sys.stderr, disable=True if not place.is_reporter else None if progress is None else not progress,
               dynamic_ncols=True)
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
        if trainer.val and (res.step % r.eval_every == 0 or res.step == r.steps):
            val_loss = trainer.evaluate()
            history["val"].append([res.step, val_loss])
            # without a progress bar (output to a file), the evaluations are the progress report
            if place.is_reporter:
                log.log(logging.INFO if bar.disable else logging.DEBUG,
                        "step %d/%d: train loss %.3f, validation loss %.3f, %.0f tokens/s", res.step, r.steps,
                        res.loss, val_loss, tps)
        elif trainer.val and res.step == last_step:          # stopping early: for the summary, not the history
            val_loss = trainer.evaluate()
        bar.set_postfix(loss=f"{res.loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        if (r.save_every and res.step % r.save_every == 0) or res.step == last_step:
            run.checkpoint()
    bar.close()
    if not history["train"]:
        run.checkpoint()
    return LoopTotals(tokens_run, time.perf_counter() - t_loop, val_loss)


# -- the summary and the export -------------------------------------------------------------------------------
def summarize(run: Run, totals: LoopTotals, export: str | Path | None = None) -> dict[str, Any]:
    """The run's summary (``sirocco train --json``): steps, losses (the training loss averaged over the last
    10 steps), speed, epochs, where the files are; nan values as None."""
    last = run.history["train"][-10:]
    at = run.trainer.position
    val_loss = totals.val_loss
    summary = {
        "out": str(run.out), "steps": run.trainer.step, "parameters": run.n_params,
        "moe": run.step_fn.args.moe is not None,
        "train_loss": sum(x[1] for x in last) / len(last) if last else math.nan,
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
        "unigram_entropy": run.baseline, "tokens_per_s": totals.tokens / totals.seconds if totals.tokens else 0.0,
        "train_seconds": run.elapsed(),
        "epochs": at.epoch + at.row / max(1, run.trainer.stream.rows_in_epoch(at.epoch)),
        "export": None if export is None else str(export), "recipe": str(run.out / RECIPE),
        **run.place.summary(run.history),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def export_model(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Path | None, folder: str | Path,
                 dtype: torch.dtype) -> None:
    """The model alone (no training state) in ``dtype``, with its tokenizer: a folder to ship."""
    save_consolidated(state, args, folder, dtype=dtype)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(folder) / tokenizer.name)
    log.info("exported the model in %s to %s", str(dtype).removeprefix("torch."), folder)
