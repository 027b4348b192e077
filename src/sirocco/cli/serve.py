"""``sirocco serve``: an OpenAI-compatible HTTP server (completions, chat, models, metrics) over one Engine."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import SiroccoError
from ..pretrained import DEFAULT_MODEL
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_pipeline_arguments,
    int_in,
    load_from_args,
    non_negative_int,
)

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a model over HTTP with OpenAI's API: POST /v1/completions, /v1/chat/completions "
                     "(streaming or not), GET /v1/models, /health, /metrics (Prometheus), POST /tokenize, "
                     "/detokenize. Requests share the engine's cache rows; a long prompt is pre-filled in chunks.")
    p.epilog = ("examples:\n"
                "  sirocco serve --model ./mistral-7b --dtype bfloat16 --port 8000\n"
                "  SIROCCO_API_KEY=secret sirocco serve --max-rows 16 --max-queue 64\n"
                "  curl localhost:8000/v1/completions -H 'content-type: application/json' \\\n"
                "       -d '{\"prompt\": \"The sliding window\", \"max_tokens\": 16}'")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    h.add_argument("--port", type=int_in(0, 65535), default=8000, help="port to listen on, 0 to 65535 (default 8000)")
    h.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: the "
                        "SIROCCO_API_KEY environment variable; none: open)")
    h.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model's folder name)")
    h.add_argument("--max-queue", type=non_negative_int, default=128,
                   help="most sequences waiting for a cache row; past it requests get 429 at once (default 128)")
    e = p.add_argument_group("engine")
    add_engine_arguments(e, max_seq_len=True)
    e.add_argument("--no-mixed", dest="mixed", action="store_false",
                   help="pre-fill steps apart from decode steps (running decodes wait while a prompt is "
                        "pre-filled); by default a step carries the decodes and then pre-fill chunks")
    add_pipeline_arguments(p)


def served_name(model: str | None) -> str:
    """The folder's name for a path, the bundled model's name for a name."""
    name = model or DEFAULT_MODEL
    return Path(name.rstrip("/")).name or name


def build(args: argparse.Namespace):
    """The engine and app that the options describe (tests build servers with this too)."""
    from ..generate.engine import Engine
    from ..serve.app import build_app, wrap_executor

    if args.pipeline_ranks > 1:
        raise SiroccoError("serve: --pipeline-ranks > 1 is not supported yet (rank 0 would have to broadcast "
                           "every step's adds and aborts to the other ranks); serve on one process")
    if args.max_queue < 0:
        raise SiroccoError(f"--max-queue must be >= 0, got {args.max_queue}")
    loaded = load_from_args(args)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=args.max_rows, chunk_size=args.chunk_size,
                    max_seq_len=args.max_seq_len, max_batch_tokens=args.max_batch_tokens, attention=args.attention,
                    backend=args.backend,
                    executor=wrap_executor(loaded.model), mixed=args.mixed)
    api_key = args.api_key if args.api_key is not None else os.environ.get("SIROCCO_API_KEY") or None
    name = args.served_model_name or served_name(args.model)
    log.info("serving %s as '%s': %d rows, context %d, queue %d%s", loaded.source, name, args.max_rows,
             engine.max_seq_len, args.max_queue, ", API key required" if api_key else "")
    return build_app(engine, loaded.tokenizer, name, api_key=api_key, max_queue=args.max_queue)


def run(args: argparse.Namespace) -> int:
    import sys

    import uvicorn

    app = build(args)
    print(f"sirocco serve: listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
