"""``sirocco perplexity``: the perplexity of a model on a text file, in windows of a context with a stride."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import SiroccoError
from ..eval import perplexity
from .options import (
    add_model_arguments,
    add_progress_argument,
    int_at_least,
    load_from_args,
    positive_int,
    utf8_text_file,
)

DESCRIPTION = """The mean negative log-likelihood per token and the perplexity of a text under a model. The text is
encoded whole (BOS first) and scored in windows of --context tokens starting every --stride tokens; each window
scores only the tokens the previous one did not, so every token but the first is scored once (Hugging Face's
"perplexity of fixed-length models" scheme)."""


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = ("examples:\n"
                "  sirocco perplexity --text-file wiki.test.raw --context 1024 --stride 512\n"
                "  sirocco perplexity --model m.gguf --text-file wiki.test.raw --json\n"
                "  sirocco perplexity --model ./mistral-7b --quantize int4 --text-file wiki.test.raw")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--text-file", type=utf8_text_file, required=True, metavar="PATH",
                   help="the text to score (UTF-8)")
    p.add_argument("--context", type=int_at_least(2), default=None,
                   help="tokens per window (default: the model's max_seq_len, at most 1024)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="tokens between window starts (default: half the context)")
    p.add_argument("--json", action="store_true", help='print {"tokens", "nats_per_token", "perplexity"}')
    add_progress_argument(p)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SiroccoError(f"cannot read --text-file: {e}") from None
    loaded = load_from_args(args)
    ids = loaded.tokenizer.encode(text, bos=True)
    if len(ids) < 2:
        raise SiroccoError(f"{args.text_file}: the text has no tokens to score")
    context = args.context or min(loaded.model.args.max_seq_len, 1024)
    stride = args.stride or max(1, context // 2)
    try:
        result = perplexity(loaded.model, ids, context, stride, progress=False if args.no_progress else None)
    except ValueError as e:
        raise SiroccoError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.tokens} tokens scored (context {context}, stride {stride}): {result.nats_per_token:.4f} nats "
              f"per token, perplexity {result.perplexity:.3f}")
    print(f"sirocco: {loaded.source}", file=sys.stderr)
    return 0
