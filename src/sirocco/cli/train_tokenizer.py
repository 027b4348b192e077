"""``sirocco train-tokenizer``: a sentencepiece BPE tokenizer with Mistral's special tokens."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..tokenizer import load_tokenizer
from ..train.corpus import DEFAULT, load_corpus
from ..train.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
from .options import float_in, int_at_least

log = logging.getLogger(__name__)

DESCRIPTION = """Train a sentencepiece BPE tokenizer on a corpus and write tokenizer.model. It follows the
conventions of Mistral's sentencepiece tokenizers: <unk> is id 0, <s> (BOS) id 1, </s> (EOS) id 2, there is no
padding token, and byte fallback makes every text encodable (a character not in the vocabulary becomes its UTF-8
bytes <0x00>..<0xFF>). Digits are split one by one and spaces are kept as they are, so code stays intact.
The corpus is the training split of --corpus (the Python documentation by default)."""

EXAMPLES = """examples:
  sirocco train-tokenizer --vocab-size 4096 --out tokenizer.model
  sirocco train-tokenizer --corpus ./notes --vocab-size 8000 --out notes/tokenizer.model
  sirocco train --tokenizer tokenizer.model --out runs/x     # train a model with it"""


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--corpus", default=DEFAULT,
                   help="'default' (the Python documentation), a folder of text files, or a .jsonl file")
    p.add_argument("--vocab-size", type=int_at_least(MIN_VOCAB_SIZE), default=4096,
                   help=f"pieces, specials and bytes included, at least {MIN_VOCAB_SIZE} (default 4096)")
    p.add_argument("--out", default="tokenizer.model", help="file to write (default ./tokenizer.model)")
    p.add_argument("--val-fraction", type=float_in(0, 1, hi_open=True), default=0.05,
                   help="share of documents held out as in 'sirocco train', in [0, 1) (not trained on; "
                        "default 0.05)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on standard output")


def run(args: argparse.Namespace) -> int:
    corpus = load_corpus(args.corpus, args.val_fraction)
    t0 = time.perf_counter()
    out = train_tokenizer([d.text for d in corpus.train], args.vocab_size, Path(args.out))
    seconds = time.perf_counter() - t0
    tok = load_tokenizer(out)
    chars = sum(len(d.text) for d in corpus.val)
    tokens = sum(len(tok.encode(d.text, bos=False)) for d in corpus.val)
    summary = {"out": str(out), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
               "unk_id": 0, "train_documents": len(corpus.train), "seconds": seconds,
               "val_chars_per_token": chars / tokens if tokens else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}: {tok.vocab_size} pieces (<unk> 0, <s> {tok.bos_id}, </s> {tok.eos_id}), trained on "
              f"{len(corpus.train)} documents in {seconds:.1f} s"
              + (f"; {chars / tokens:.2f} characters per token on the validation documents" if tokens else ""),
              file=sys.stderr)
    return 0
