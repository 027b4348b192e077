"""The ``sirocco`` command: one module per verb in this package, each with ``configure(parser)`` and
``run(args) -> int``; options shared by several verbs are declared once in options.py. This file only
dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import SiroccoError

# verb -> (module, one-line help). Every verb's module is imported to build the parser (for --help).
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("sirocco.cli.generate", "continue prompts with a model (packed, cached, chunked)"),
    "serve": ("sirocco.cli.serve", "serve a model over HTTP with OpenAI's API (completions, chat, metrics)"),
    "chat": ("sirocco.cli.chat", "chat with a model in the terminal (streamed answers, the chat template)"),
    "convert": ("sirocco.cli.convert", "rewrite a checkpoint in the other format (consolidated <-> Hugging Face)"),
    "train": ("sirocco.cli.train", "train or fine-tune a model on packed documents (recipes, resume, loss curve)"),
    "train-tokenizer": ("sirocco.cli.train_tokenizer",
                        "train a sentencepiece BPE tokenizer with Mistral's special ids"),
    "viz": ("sirocco.cli.viz", "draw masks, cache, receptive field, MoE routing, pipeline or memory from a real run"),
    "quantize": ("sirocco.cli.quantize", "write a model as a GGUF file of q8_0 or q4_0 blocks (llama.cpp loads it)"),
    "perplexity": ("sirocco.cli.perplexity", "perplexity of a model on a text, in windows of a context with a stride"),
}

EPILOG = """examples:
  sirocco generate "The sliding window"              # the default model
  sirocco generate --model ./Mistral-7B-v0.1 --dtype bfloat16 "def fib(n):"
  sirocco generate --json --prompts-file prompts.txt  # one JSON object per prompt
  sirocco serve --model ./Mistral-7B-v0.1 --port 8000   # OpenAI's API on 127.0.0.1:8000
  sirocco chat --model ./Mistral-7B-Instruct-v0.2
run 'sirocco VERB --help' for the options of each verb."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sirocco", description="Mistral and Mixtral in plain PyTorch.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to standard error")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    for name, (module, help_text) in COMMANDS.items():
        # prog "sirocco VERB" whatever the main parser's options: argparse's errors then start
        # "sirocco VERB: error:", as those of run() do.
        p = sub.add_parser(name, prog=f"sirocco {name}", help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="sirocco: %(message)s", stream=sys.stderr)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SiroccoError as e:
        print(f"sirocco {args.command}: error: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
