"""``sirocco chat``: talk with a model in the terminal, over the same Engine the server uses.

The conversation is kept as chat messages and encoded with the model's chat template at every turn (the same
``tokenizer.encode_chat`` as ``generate --chat``). The engine's prefix store (``--prefix-cache-mib``) keeps the
pre-filled state of each turn's prompt, so the next turn, which starts with it, pre-fills only the answer and the
new message. Commands: /reset forgets the conversation, /system TEXT sets the system prompt (and resets), /exit
leaves (so does Ctrl-D). Ctrl-C while an answer streams stops that answer and keeps what was written; the engine is
only ever interrupted between steps. With standard input from a pipe, each line is one user turn of one
conversation: the answers are printed, one after another, and the verb exits at the end of the input. With
``--web``, the verb serves the chat page instead (``sirocco serve``'s app on 127.0.0.1 only) and prints its
address.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, TextIO

from ..errors import SiroccoError
from ..generate.engine import Engine, PromptTooLong
from ..generate.sampling import SamplingParams
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_sampling_arguments,
    add_speculation_arguments,
    int_in,
    load_from_args,
    prefix_cache_bytes,
    speculation_from_args,
)

HELP = "commands: /reset (new conversation), /system TEXT (system prompt, resets), /exit; Ctrl-C stops an answer"


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Chat with a model in the terminal: streamed answers, the conversation kept in the model's "
                     "chat template. " + HELP + ". With a pipe on standard input, answers each line and exits.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  sirocco chat --model ./Mistral-7B-Instruct-v0.2 --dtype bfloat16\n"
                "  printf 'Hello\\nWhat did I just say?\\n' | sirocco chat --temperature 0\n"
                "  sirocco chat --web                  # the chat page in a browser, with the engine drawn beside it")
    add_model_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--system", default=None, metavar="TEXT", help="system prompt of the conversation")
    add_sampling_arguments(s, max_tokens=512, seed=None, per="answer")
    add_engine_arguments(p.add_argument_group("engine"), rows=False, chunks=False, max_seq_len=True,
                         prefix_cache=True)
    add_speculation_arguments(p.add_argument_group("speculative decoding"))
    w = p.add_argument_group("web")
    w.add_argument("--web", action="store_true",
                   help="serve the chat page on this machine (127.0.0.1) and print its address, until Ctrl-C; the "
                        "page has its own sampling settings")
    w.add_argument("--port", type=int_in(0, 65535), default=0,
                   help="the page's port with --web, 0 to 65535 (default 0: a free one)")


class Chat:
    """One conversation over an engine. ``answer(text, out)`` streams the reply to ``out`` and keeps it."""

    def __init__(self, engine: Engine, tokenizer, params: SamplingParams, system: Optional[str] = None):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.system = system
        self.messages: list[dict] = []
        self.turns = 0
        self.interrupted = False

    def reset(self, system: Optional[str] = None, keep_system: bool = True) -> None:
        self.messages = []
        if not keep_system:
            self.system = system

    def prompt_ids(self) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.encode_chat(system + self.messages)

    def answer(self, text: str, out: TextIO) -> Optional[str]:
        """Stream the reply to ``text``; None (and the turn forgotten) if the conversation no longer fits."""
        self.messages.append({"role": "user", "content": text})
        seed = None if self.params.seed is None else self.params.seed + self.turns
        params = SamplingParams(**{**vars(self.params), "seed": seed})
        try:
            rid = self.engine.add_request(self.prompt_ids(), params)
        except PromptTooLong as e:
            self.messages.pop()
            print(f"sirocco chat: the conversation no longer fits ({e}); /reset starts a new one", file=sys.stderr)
            return None
        self.turns += 1
        self.interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        aborted = False
        if previous is not None and sys.stdin.isatty():
            signal.signal(signal.SIGINT, self._on_interrupt)   # only between steps: never inside the model
        try:
            reply = None
            while reply is None:
                if self.interrupted and not aborted:
                    self.engine.abort(rid)
                    aborted = True
                for ev in self.engine.step():
                    if getattr(ev, "request_id", rid) != rid:
                        continue
                    if ev.text:
                        out.write(ev.text)
                        out.flush()
                    if ev.completion is not None:
                        reply = ev.completion
        finally:
            if previous is not None and sys.stdin.isatty():
                signal.signal(signal.SIGINT, previous)
        out.write("\n")
        out.flush()
        text_out = reply.text
        if aborted:
            print("[stopped]", file=sys.stderr)
        self.messages.append({"role": "assistant", "content": text_out})
        return text_out

    def _on_interrupt(self, signum, frame) -> None:
        self.interrupted = True


WEB_ROWS = 4          # the page, a second tab, a regenerate racing a stop


def run_web(args: argparse.Namespace) -> int:
    """``--web``: the server's app (chat page, inside panel, API) over this model, on 127.0.0.1 only."""
    import socket

    import uvicorn

    from ..serve.app import build_app
    from ..serve.model_thread import ModelThread
    from ..viz.inside import RowTrace
    from .serve import serve_until_stopped, served_name, stop_pages_on_exit

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", args.port))
    except OSError as e:
        sock.close()
        raise SiroccoError(f"chat --web: cannot listen on 127.0.0.1:{args.port}: {e.strerror}") from None
    model_thread = ModelThread()             # loaded, built and run on one thread (see serve.model_thread)
    loaded = model_thread.call(load_from_args, args)
    engine = model_thread.call(lambda: Engine(loaded.model, loaded.tokenizer, max_rows=WEB_ROWS,
                                              max_seq_len=args.max_seq_len,
                                              prefix_cache_bytes=prefix_cache_bytes(args)))
    app = build_app(engine, loaded.tokenizer, served_name(args.model), model_thread=model_thread,
                    inside=RowTrace)
    port = sock.getsockname()[1]
    print(f"sirocco chat: open http://127.0.0.1:{port}/ in a browser (Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    stop_pages_on_exit(server, app)
    try:
        serve_until_stopped(server, sockets=[sock])
    finally:
        sock.close()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.web:
        return run_web(args)
    loaded = load_from_args(args)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=1, max_seq_len=args.max_seq_len,
                    speculation=speculation_from_args(args, loaded),
                    prefix_cache_bytes=prefix_cache_bytes(args))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise SiroccoError(str(e)) from None
    chat = Chat(engine, loaded.tokenizer, params, system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"sirocco chat with {loaded.source}; {HELP}; Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:                  # Ctrl-C at the prompt clears the line, as a shell does
            print(file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            chat.reset()
            print("[new conversation]", file=sys.stderr)
            continue
        if command == "/system":
            chat.reset(rest.strip() or None, keep_system=False)
            print(f"[system prompt {'set' if rest.strip() else 'cleared'}; new conversation]", file=sys.stderr)
            continue
        if command.startswith("/") and command[1:].isalpha():
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
            continue
        chat.answer(line, sys.stdout)
    return 0
