"""``sirocco viz KIND``: pictures of the mechanisms, recorded from a real run of the engine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import viz
from ..generate.speculation import ROW_EXACT_TOKENS
from ..tokenizer.base import Tokenizer
from .options import add_machine_arguments, int_in, non_negative_int, positive_int

DESCRIPTION = """Draw what sirocco's engine really did in a run: every step's attention masks as the plan lowered
them, the rolling cache's slots over time, the receptive field of a token layer by layer (checked against
gradients), the experts a MoE router chose, a pipeline schedule's stages over time, and the KV-cache memory
against the sequence length. Writes a PNG (--out) and prints a character grid; --json prints the recorded data."""

EXAMPLES = """examples:
  sirocco viz masks --prompts 7,5,6 --window 3 --chunk-size 4 --out masks.png
  sirocco viz masks --model sirocco-tiny --chunk-size 16 "The with statement" "Return a new dictionary"
  sirocco viz cache --prompts 6 --window 4 --max-tokens 6 --out cache.png
  sirocco viz cache --prompts 6 --window 4 --max-tokens 14 --draft-tokens 3 --out rollback.png   # speculative
  sirocco viz cache --model sirocco-tiny --ids 1,624,1467,1351 --max-tokens 1 --json   # given token ids
  sirocco viz receptive-field --window 3 --layers 5 --token 12 --out rf.png
  sirocco viz moe --text "The with statement wraps a block" --out moe.png      # the bundled MoE model
  sirocco viz pipeline --ranks 2 --micro-batches 4 --out pipeline.png
  sirocco viz memory --model sirocco-tiny --json"""

DEFAULT_MOE_MODEL = "sirocco-tiny-moe"


def _int_list(what: str, least: int, need: str) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of integers, none below ``least``."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
        if not values or min(values) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: {need}")
        return values
    return parse


_lengths = _int_list("token counts", 1, "every prompt needs at least 1 token")
_ids = _int_list("token ids", 0, "a prompt needs at least one token id, none negative")


def png_path(text: str) -> Path:
    """Where --out writes: a file path, '.png' added when it has no suffix ('masks' -> masks.png). An existing
    folder, or a suffix other than .png, is refused: the picture is always a PNG file."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the PNG file to write, such as "
                                         f"{str(path / 'picture.png')!r}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r}: the picture is written as PNG; give a name ending in .png "
                                         "(or no suffix: .png is added)")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} would be written as {str(path)!r}, which is a folder; give "
                                         "the PNG file to write")
    return path


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("kind", choices=viz.KINDS, help="what to draw")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="prompt texts for masks, cache and moe with --model")
    p.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a model to run (folder or bundled name) on TEXT prompts; without it masks, cache and "
                        "receptive-field run a tiny random model on --prompts token lengths, and moe runs "
                        f"{DEFAULT_MOE_MODEL} on --text")
    p.add_argument("--prompts", type=_lengths, default=None, metavar="N,N,...",
                   help="prompt lengths in tokens, random tokens on a tiny random model (default 7,5,6 for "
                        "masks, 6 for cache)")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a prompt text (repeatable)")
    p.add_argument("--ids", type=_ids, action="append", default=[], metavar="N,N,...",
                   help="a prompt as token ids, for masks, cache and moe with --model (repeatable; instead of "
                        "texts)")
    p.add_argument("--window", type=positive_int, default=None, metavar="W",
                   help="sliding window of the tiny random model (default 3 for masks and receptive-field, 4 "
                        "for cache)")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="C",
                   help="pre-fill chunk (default: the window)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens generated after the pre-fill (default 2 for masks, 4 for cache and moe)")
    p.add_argument("--draft-tokens", type=int_in(0, ROW_EXACT_TOKENS - 1), default=0, metavar="K",
                   help="masks and cache: a speculative run, drafts of up to K tokens on a ring of W + K slots; the "
                        "drafts are the run's own greedy continuation with about one token in two made wrong, so "
                        "some are accepted and some rejected and rolled back (default 0: plain decode)")
    p.add_argument("--layers", type=positive_int, default=5, help="layers (receptive-field; default 5)")
    p.add_argument("--token", type=non_negative_int, default=None, metavar="P",
                   help="position of the token whose receptive field is drawn (default: the last of the prompt)")
    p.add_argument("--ranks", type=positive_int, default=2, help="pipeline stages (default 2)")
    p.add_argument("--micro-batches", type=positive_int, default=4,
                   help="micro-batches of the pipeline step (default 4)")
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe", help="pipeline schedule (default gpipe)")
    p.add_argument("--out", type=png_path, default=None, metavar="FILE.png",
                   help="write the picture to this file ('.png' is added to a name without a suffix)")
    p.add_argument("--json", action="store_true", help="print the recorded data as JSON instead of the grid")
    add_machine_arguments(p)


def _prompt_ids(tokenizer: Tokenizer, texts: list[str], ids: list[list[int]] | None = None,
                vocab_size: int | None = None) -> list[list[int]]:
    """The prompts as token ids: ``ids`` as given (checked against the vocabulary), else the texts encoded."""
    if ids:
        wrong = [t for p in ids for t in p if vocab_size is not None and t >= vocab_size]
        if wrong:
            raise SystemExit(f"sirocco viz: error: --ids names token ids outside the vocabulary of {vocab_size}: "
                             f"{wrong[:5]}")
        return [list(p) for p in ids]
    return [tokenizer.encode(t, bos=True, eos=False) for t in texts]


def _loaded(name: str | None) -> Any:
    from ..pretrained import load
    return load(name, backend="torch")          # the pictures record the plain-PyTorch run


def record(args: argparse.Namespace) -> tuple[dict, str]:
    """The data and terminal text of ``args.kind``."""
    texts = list(args.texts) + list(args.text)
    kind = args.kind
    if args.draft_tokens and kind not in ("masks", "cache"):
        raise SystemExit(f"sirocco viz: error: --draft-tokens draws masks and cache, not {kind}")
    if args.ids and (kind not in ("masks", "cache", "moe") or (kind != "moe" and args.model is None)):
        raise SystemExit("sirocco viz: error: --ids gives prompts to the model of --model (masks, cache, moe)")
    if kind in ("masks", "cache"):
        window = args.window or (3 if kind == "masks" else 4)
        max_tokens = args.max_tokens or (2 if kind == "masks" else 4)
        fn = viz.masks if kind == "masks" else viz.cache
        extra: dict[str, Any] = {"draft_tokens": args.draft_tokens} if args.draft_tokens else {}
        if args.model is not None:
            loaded = _loaded(args.model)
            prompts = _prompt_ids(loaded.tokenizer, texts or ["The sliding window"], args.ids,
                                  loaded.model.args.vocab_size)
            ws = [w for w in loaded.model.args.windows() if w is not None]
            return fn(prompts, window=min(ws) if ws else None, chunk_size=args.chunk_size,
                      max_tokens=max_tokens, model=loaded.model, **extra)
        return fn(args.prompts or ((7, 5, 6) if kind == "masks" else (6,)), window=window,
                  chunk_size=args.chunk_size, max_tokens=max_tokens, **extra)
    if kind == "receptive-field":
        window = args.window or 3
        length = max((args.prompts or [0])[0], (args.token or 0) + 1, window * args.layers)
        return viz.receptive_field(length=length, window=window, n_layers=args.layers, chunk_size=args.chunk_size,
                                   token=args.token)
    if kind == "moe":
        loaded = _loaded(args.model or DEFAULT_MOE_MODEL)
        if loaded.model.args.moe is None:
            raise SystemExit(f"sirocco viz: error: {loaded.source} has no mixture of experts")
        prompts = _prompt_ids(loaded.tokenizer, texts or ["The with statement is used to wrap the execution of a "
                                                          "block with methods defined by a context manager."],
                              args.ids, loaded.model.args.vocab_size)
        data, text = viz.moe(prompts, max_tokens=args.max_tokens or 4, chunk_size=args.chunk_size,
                             model=loaded.model)
        data["text"] = [None if i is None else loaded.tokenizer.decode([i]) for i in data["ids"]]
        return data, text
    if kind == "pipeline":
        return viz.pipeline(stages=args.ranks, micro_batches=args.micro_batches, schedule=args.schedule)
    if args.model is not None:                                              # memory
        return viz.memory(_loaded(args.model).model.args)
    return viz.memory()


def run(args: argparse.Namespace) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    data, text = record(args)
    if args.out is not None:
        path = viz.write_png(args.kind, data, args.out)
        print(f"sirocco viz: wrote {path} ({Path(path).stat().st_size} bytes)", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        print(text)
    return 0
