"""Tiny random Mistral and Mixtral checkpoints with a real sentencepiece tokenizer (the bundled model's), and an
in-process ``sirocco serve`` on 127.0.0.1 at a free port, for the server and chat tests."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import torch

from sirocco.checkpoint import save_consolidated
from sirocco.cli import build_parser, main
from sirocco.config import preset
from sirocco.model import build_model
from sirocco.pretrained import BUNDLED

TOKENIZER = BUNDLED / "sirocco-tiny" / "tokenizer.model"        # sentencepiece, 4096 pieces with byte fallback
SHAPES = {
    # a window of 16 and chunks of 16: prompts are pre-filled over several steps and the cache rolls
    "mistral": preset("tiny", vocab_size=4096, sliding_window=16, max_seq_len=2048),
    "mixtral": preset("tiny-moe", vocab_size=4096, max_seq_len=2048),
}


def write_checkpoint(kind: str, folder: Path, seed: int = 0) -> Path:
    args = SHAPES[kind]
    model = build_model(args, dtype=torch.float32, seed=seed)
    save_consolidated(model, args, folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.model")
    return folder


def generate_json(model: Path, prompts: list[str], *options: str) -> list[dict]:
    """``sirocco generate --json`` in this process: one dict per prompt."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["generate", "--model", str(model), "--json", "--no-progress", "--temperature", "0",
                     *options, *prompts])
    assert code == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


@contextlib.contextmanager
def serve(model: Path, *options: str):
    """``sirocco serve --model MODEL OPTIONS`` in a thread of this process, bound to 127.0.0.1 on a port the OS
    picks; yields the base URL and the app's Server; stopped (and its engine thread joined) on exit."""
    import uvicorn

    from sirocco.cli import serve as serve_cli

    args = build_parser().parse_args(["serve", "--model", str(model), *options])
    app = serve_cli.build(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in Prometheus' text format (``labels`` as written, e.g. 'finish_reason="abort"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)
