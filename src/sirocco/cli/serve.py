"""``sirocco serve``: an OpenAI-compatible HTTP server (completions, chat, models, metrics) over one Engine, in one
process or over pipeline ranks (rank 0 serves HTTP, the other ranks run their stages: ``serve.pipeline``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from ..distributed.launch import DistContext
from ..errors import SiroccoError
from ..pretrained import DEFAULT_MODEL
from ..serve.doors import DEFAULT_MAX_BODY_MIB, MIB
from .options import (
    DTYPES,
    add_engine_arguments,
    add_model_arguments,
    add_pipeline_arguments,
    add_speculation_arguments,
    engine_backend,
    int_in,
    load_from_args,
    non_negative_int,
    positive_float,
    prefix_cache_bytes,
    speculation_from_args,
)

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a model over HTTP with OpenAI's API: POST /v1/completions, /v1/chat/completions "
                     "(streaming or not), GET /v1/models, /health, /metrics (Prometheus), POST /tokenize, "
                     "/detokenize; and a chat page at / (open the address in a browser), with a panel that draws "
                     "what the engine does for the answer being written: cache slots, masks, experts, steps. "
                     "Requests share the engine's cache rows; a long prompt is pre-filled in chunks. "
                     "Under torchrun with --pipeline-ranks N, rank 0 serves HTTP and the other ranks run their "
                     "stages (rank 0 broadcasts each step's new and aborted requests, and a heartbeat every second "
                     "when idle).")
    p.epilog = ("examples:\n"
                "  sirocco serve --model ./mistral-7b --dtype bfloat16 --port 8000\n"
                "  SIROCCO_API_KEY=secret sirocco serve --max-rows 16 --max-queue 64\n"
                "  # on the network under a name, called from one web app's pages\n"
                "  sirocco serve --host 0.0.0.0 --allowed-hosts gpu-box.lan --allow-origin https://app.example\n"
                "  curl localhost:8000/v1/completions -H 'content-type: application/json' \\\n"
                "       -d '{\"prompt\": \"The sliding window\", \"max_tokens\": 16}'\n"
                "  # over 2 pipeline ranks: rank 0 serves HTTP, rank 1 runs the second half of the layers\n"
                "  torchrun --nproc-per-node 2 -m sirocco.cli serve --pipeline-ranks 2 --model ./Mixtral-8x7B")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    h.add_argument("--port", type=int_in(0, 65535), default=8000, help="port to listen on, 0 to 65535 (default 8000)")
    h.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: the "
                        "SIROCCO_API_KEY environment variable; none: open); the chat page asks for it")
    h.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model's folder name)")
    h.add_argument("--max-queue", type=non_negative_int, default=128,
                   help="most sequences waiting for a cache row; past it requests get 429 at once (default 128)")
    h.add_argument("--allowed-hosts", type=host_names, action="extend", default=[], metavar="NAMES",
                   help="more Host names to answer, comma-separated or repeated ('*.example.com' for a domain, "
                        "'*' for any); besides these, requests get 403 unless their Host is the --host address, "
                        "localhost, 127.0.0.1 or [::1] (or any IP address when bound to 0.0.0.0 or ::), which "
                        "stops web pages that rebind their own name to this address")
    h.add_argument("--allow-origin", type=origin, action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example.com, with a port if not the scheme's) whose pages may "
                        "call this server: CORS headers for it alone; repeatable, '*' for any. By default no CORS "
                        "headers, so no page of another origin can read an answer or send JSON")
    h.add_argument("--max-body-mib", type=positive_float, default=DEFAULT_MAX_BODY_MIB, metavar="MIB",
                   help=f"largest request body in MiB; a larger one gets 413 before it is read (default "
                        f"{DEFAULT_MAX_BODY_MIB}: a 128k-token prompt is 0.5 to 1.5 MB of JSON)")
    e = p.add_argument_group("engine")
    add_engine_arguments(e, max_seq_len=True, prefix_cache=True)
    e.add_argument("--no-mixed", dest="mixed", action="store_false",
                   help="pre-fill steps apart from decode steps (running decodes wait while a prompt is "
                        "pre-filled); by default a step carries the decodes and then pre-fill chunks")
    add_speculation_arguments(p.add_argument_group("speculative decoding"))
    add_pipeline_arguments(p)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


def host_names(text: str) -> list[str]:
    """--allowed-hosts: comma-separated host names ('a.example,b.example:8000', '*.lan', '*'); the port is
    ignored, as the Host check ignores it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no host")
    for n in names:
        if "/" in n or " " in n:
            raise argparse.ArgumentTypeError(f"{n!r} is not a host name: give the name alone, as in a Host header "
                                             "(example.com, example.com:8000), not a URL")
        if "*" in n and n != "*" and not (n.startswith("*.") and "*" not in n[2:]):
            raise argparse.ArgumentTypeError(f"{n!r}: '*' stands alone (any Host) or starts a domain ('*.example.com')")
    return names


def origin(text: str) -> str:
    """--allow-origin: scheme://host[:port] exactly as a browser sends it in Origin (no path, no trailing '/'),
    or '*'."""
    if text == "*" or _ORIGIN.fullmatch(text.lower()):
        return text.lower()
    raise argparse.ArgumentTypeError(f"{text!r} is not an origin: write scheme://host[:port] as browsers send it "
                                     "(https://app.example.com, http://localhost:3000), with no path or trailing '/'")


def served_name(model: str | None) -> str:
    """The folder's name for a path, the bundled model's name for a name."""
    name = model or DEFAULT_MODEL
    return Path(name.rstrip("/")).name or name


def make_engine(args: argparse.Namespace, model, tokenizer, executor=None, speculation=None):
    """The serving Engine the options describe, over ``model`` (a whole model or this rank's stage; ``executor``:
    this rank's ``PipelineExecutor``, or None for one process; ``speculation``: from ``speculation_from_args``)."""
    from ..generate.engine import Engine
    return Engine(model, tokenizer, max_rows=args.max_rows, chunk_size=args.chunk_size,
                  max_seq_len=args.max_seq_len, max_batch_tokens=args.max_batch_tokens, executor=executor,
                  mixed=args.mixed, speculation=speculation, prefix_cache_bytes=prefix_cache_bytes(args))


def make_app(args: argparse.Namespace, engine, tokenizer, source: str, where: str = "", channel: Any = None,
             model_thread: Any = None):
    """The app over ``engine``, named and guarded as the options say; logs what is served."""
    from ..serve.app import build_app
    from ..viz.inside import RowTrace

    api_key = args.api_key if args.api_key is not None else os.environ.get("SIROCCO_API_KEY") or None
    name = args.served_model_name or served_name(args.model)
    log.info("serving %s as '%s'%s: %d rows, context %d, queue %d%s", source, name, where, args.max_rows,
             engine.max_seq_len, args.max_queue, ", API key required" if api_key else "")
    return build_app(engine, tokenizer, name, api_key=api_key, max_queue=args.max_queue, channel=channel,
                     model_thread=model_thread, bind_host=args.host, allowed_hosts=args.allowed_hosts,
                     allow_origins=args.allow_origin, max_body=max(1, int(args.max_body_mib * MIB)),
                     inside=RowTrace)


def build(args: argparse.Namespace):
    """The engine and app that the options describe, in one process (tests build servers with this too)."""
    from ..serve.model_thread import ModelThread

    if args.pipeline_ranks > 1:
        raise SiroccoError("serve: --pipeline-ranks > 1 runs on every rank of a torchrun launch (run); "
                           "build makes the one-process server")
    if args.max_queue < 0:
        raise SiroccoError(f"--max-queue must be >= 0, got {args.max_queue}")
    # Loaded, built and run on one thread, not loaded here and run on the engine's: see serve.model_thread.
    model_thread = ModelThread()
    loaded = model_thread.call(load_from_args, args)
    speculation = model_thread.call(speculation_from_args, args, loaded)
    engine = model_thread.call(make_engine, args, loaded.model, loaded.tokenizer, None, speculation)
    return make_app(args, engine, loaded.tokenizer, str(loaded.source), model_thread=model_thread)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if args.pipeline_ranks > 1:
        from ..distributed.run import on_ranks
        if args.speculate not in (None, "ngram"):
            raise SiroccoError("--speculate with a draft model runs in one process: over --pipeline-ranks, "
                               "--speculate ngram")
        with _signals_restored():
            return on_ranks(args, lambda ctx: run_on_rank(args, ctx))
    app = build(args)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    stop_pages_on_exit(server, app)
    print(f"sirocco serve: listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    serve_until_stopped(server)
    if not server.started:                  # it could not start (the port is taken...): uvicorn said why
        raise SiroccoError(f"could not serve on {args.host}:{args.port} (uvicorn's message is above)")
    return 0


def serve_until_stopped(server: Any, **run: Any) -> None:
    """``server.run(**run)`` (a ``uvicorn.Server``) until Ctrl-C or SIGTERM, then return: a stop asked for is a
    clean exit (status 0). uvicorn shuts down on either signal and then raises it again to the handler it found:
    SIGINT's raises KeyboardInterrupt, caught here, and SIGTERM's default would end the process (status 143), so a
    handler that does nothing stands in for it while the server runs."""
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(**run)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_pages_on_exit(server: Any, app: Any) -> None:
    """Have the signals that stop ``server`` (a ``uvicorn.Server``) end the chat pages' inside streams too: those
    never end on their own, and uvicorn waits for every open response before it stops."""
    hub = app.state.server.inside
    handle = server.handle_exit

    def handle_exit(sig, frame) -> None:
        hub.stop()
        handle(sig, frame)
    server.handle_exit = handle_exit


def run_on_rank(args: argparse.Namespace, ctx: DistContext) -> int:
    """The verb on one rank of a pipeline of ``args.pipeline_ranks`` processes under torchrun: every rank loads
    its stage and builds the same engine; rank 0 serves HTTP and leads the engine loop, the others follow it in
    their main thread until rank 0 sends stop.

    Once serving, SIGTERM and SIGINT stop rank 0's server (which sends stop to the others) and are ignored by
    the other ranks, until the process has left the group: torchrun and a terminal's Ctrl-C signal every rank,
    often twice, and a rank that died of it would fail the others instead of stopping them."""
    import uvicorn

    from ..distributed.executor import PipelineExecutor
    from ..distributed.run import load_rank_stage
    from ..distributed.stages import parameter_bytes

    # The HTTP stack (rank 0's) before the ranks meet in load_rank_stage: imported after it, it would keep the
    # other ranks waiting in their first broadcast for as long, under a timeout.
    from ..serve.app import build_app  # noqa: F401
    from ..serve.model_thread import ModelThread
    from ..serve.pipeline import PipelineChannel
    from ..serve.runner import Runner

    # Rank 0 loads, builds and runs its stage on its engine thread (see serve.model_thread); the others
    # on their main thread, which runs their engine loop.
    model_thread = ModelThread() if ctx.rank == 0 else None

    def on_model_thread(fn, *a):
        return model_thread.call(fn, *a) if model_thread is not None else fn(*a)

    stage, tokenizer, source = on_model_thread(load_rank_stage, args.model, ctx, DTYPES[args.dtype], args.quantize,
                                               engine_backend(args), args.attention)
    log.info("rank %d: loaded %s, %.1f MiB of parameters", ctx.rank, source, parameter_bytes(stage) / 2**20)
    executor = PipelineExecutor(stage, ctx, micro_batches=args.micro_batches)
    engine = on_model_thread(make_engine, args, stage, tokenizer, executor, speculation_from_args(args))
    channel = PipelineChannel(ctx)
    if ctx.rank != 0:
        _on_signals(lambda sig: log.info("rank %d: %s ignored: the ranks stop when rank 0 stops", ctx.rank,
                                         signal.Signals(sig).name))
        Runner(engine, channel=channel).run_here()
        log.info("rank %d: stopped by rank 0", ctx.rank)
        return 0
    app = make_app(args, engine, tokenizer, source, f" over {ctx.world_size} pipeline ranks", channel, model_thread)
    runner = app.state.server.runner
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    runner.on_failure = lambda: setattr(server, "should_exit", True)       # a failed engine: stop serving
    stop_pages_on_exit(server, app)
    _on_signals(lambda sig: setattr(server, "should_exit", True))
    print(f"sirocco serve: listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.run()           # uvicorn's own handlers while it runs; it raises the signal again to ours after
    except SystemExit as e:    # it could not start (the port is taken...): it said why, and stopped the engine
        raise SiroccoError(f"could not serve on {args.host}:{args.port} (uvicorn exited with {e.code}; its message "
                           "is above)") from None
    runner.stop(timeout=None)  # the engine thread's last broadcast comes before the group's final barrier
    if runner.failed is not None:
        raise SiroccoError(f"the engine failed, so the server stopped: {type(runner.failed).__name__}: "
                           f"{runner.failed}")
    log.info("rank 0: stopped")
    return 0


SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_signals(handle) -> None:
    """SIGTERM and SIGINT call ``handle(signal number)`` instead of ending the process."""
    for s in SIGNALS:
        signal.signal(s, lambda sig, frame: handle(sig))


@contextlib.contextmanager
def _signals_restored() -> Iterator[None]:
    before = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in before.items():
            if h is not None:                       # None: a handler not installed from Python, left alone
                signal.signal(s, h)
