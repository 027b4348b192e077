"""Tiny random Mistral and Mixtral checkpoints with a real sentencepiece tokenizer (the bundled model's), an
in-process ``sirocco serve`` on 127.0.0.1 at a free port, and ``sirocco serve --pipeline-ranks N`` under a real
torchrun, for the server and chat tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
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


def mixed_jobs(n: int, span: int, seeded_tokens: int) -> list[dict]:
    """``n`` greedy completions of different prompt and output lengths (4 to 3 + ``span`` tokens), then one sampled
    with a seed: the load of the "each gets its solo output" tests."""
    words = "the cat sat on a mat while rolling windows of keys slid past every layer".split()
    jobs = [dict(prompt=" ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3), max_tokens=4 + (i * 7) % span,
                 temperature=0) for i in range(n)]
    jobs.append(dict(prompt="Sampled with a seed", max_tokens=seeded_tokens, temperature=1.0, top_p=0.9, seed=1234))
    return jobs


def assert_solo_under_load(url: str, jobs: list[dict], model: str = "tiny-mistral") -> None:
    """Each job alone, then all at once as streams: every stream's text and finish equal its solo run's."""
    import openai  # here: spawn_local's ranks import this module without it

    solo = [openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120).completions.create(
        model=model, extra_body={"ignore_eos": True}, **j) for j in jobs]

    async def all_at_once():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(j):
            text, finish = "", None
            async for ch in await ac.completions.create(model=model, stream=True, extra_body={"ignore_eos": True},
                                                        **j):
                if ch.choices:
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
            return text, finish

        return await asyncio.gather(*(one(j) for j in jobs))

    for j, s, (text, finish) in zip(jobs, solo, asyncio.run(all_at_once())):
        assert text == s.choices[0].text, j
        assert finish == s.choices[0].finish_reason == "length"
        assert s.usage.completion_tokens == j["max_tokens"]


class PipelineServer:
    """``torchrun --nproc-per-node N -m sirocco.cli serve --pipeline-ranks N --model MODEL OPTIONS`` (gloo, one
    thread per rank) in a session of its own, bound to 127.0.0.1 on a free port, its output in ``log_path``.

    torchrun starts each rank in a session (and process group) of its own, so stopping is either the whole
    launch (``stop("torchrun")``: SIGTERM to torchrun's group, which passes it on to every rank) or rank 0
    alone (``stop("rank0")``: SIGTERM to rank 0's group). Either way every process must be gone after."""

    def __init__(self, model: Path, log_path: Path, *options: str, ranks: int = 2, start_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.ranks = ranks
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "sirocco.cli", "serve", "--pipeline-ranks",
               str(ranks), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--dist-backend",
               "gloo", "--threads", "1", *options]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: dict[int, int] = {}              # rank -> pid, once they are up
        self.returncode: Optional[int] = None
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.stop("torchrun")
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"torchrun exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the pipeline server did not start:\n{self.log()[-4000:]}"
            time.sleep(0.25)
        self.pids = rank_pids(self.proc.pid)
        assert sorted(self.pids) == list(range(self.ranks)), self.pids

    def stop(self, how: str = "torchrun", timeout: float = 60) -> Optional[int]:
        """SIGTERM (see the class) and wait for every process; returns torchrun's exit status. Anything still
        alive at the timeout is killed, and the test fails."""
        if self.returncode is not None:
            return self.returncode
        try:
            if how == "rank0" and 0 in self.pids:
                _signal_group(self.pids[0], signal.SIGTERM)
            else:
                _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            left = [pid for pid in [self.proc.pid, *self.pids.values()] if alive(pid)]
        finally:
            for pid in [self.proc.pid, *self.pids.values()]:
                if alive(pid):
                    _signal_group(pid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(10)
            self._log.close()
        assert not left, f"processes left behind after SIGTERM: {left}\n{self.log()[-4000:]}"
        self.returncode = self.proc.returncode
        return self.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rank_pids(parent: int) -> dict[int, int]:
    """The children of ``parent`` that have a RANK in their environment (torchrun's workers): rank -> pid."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for e in env:
            if e.startswith(b"RANK="):
                out[int(e[len(b"RANK="):])] = int(d.name)
    return out


# -- ranks of a spawn_local launch (here, not in a test module: each rank imports this module) ---------------------
def serve_rank(ctx, argv):
    """``sirocco serve ARGV`` on this rank of a ``spawn_local`` launch; returns its exit status."""
    from sirocco.cli import build_parser
    from sirocco.cli import serve as serve_cli
    return serve_cli.run(build_parser().parse_args(["serve", *argv]))


def failing_server_rank(ctx, bad_rank):
    """The serving loop without HTTP: rank 0's Runner in its thread, fed one request from an event loop, the
    other rank following; rank ``bad_rank``'s stage raises at its fourth forward. Re-raises what failed the loop."""
    from sirocco.config import preset
    from sirocco.distributed.executor import PipelineExecutor
    from sirocco.distributed.stages import rank_stage
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.serve.pipeline import PipelineChannel
    from sirocco.serve.runner import Runner

    torch.set_num_threads(1)
    stage = rank_stage(ctx, preset("tiny", vocab_size=259), seed=3)
    if ctx.rank == bad_rank:
        calls = []

        def explode(module, inputs):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("injected failure")
        stage.register_forward_pre_hook(explode)
    engine = Engine(stage, None, executor=PipelineExecutor(stage, ctx), max_rows=2,
                    max_seq_len=64)
    runner = Runner(engine, channel=PipelineChannel(ctx))
    if ctx.rank != 0:
        runner.run_here()
        return "stopped"
    runner.start()

    async def one_request():
        out: asyncio.Queue = asyncio.Queue()
        await runner.add("r", [5, 6, 7], SamplingParams(max_tokens=30, logprobs=2), out, time.perf_counter())
        while True:
            ev = await asyncio.wait_for(out.get(), 60)
            if isinstance(ev, BaseException):
                return str(ev)
            if ev.completion is not None:
                return "finished"

    answer = asyncio.run(one_request())
    runner.stop()
    assert answer.startswith("the engine failed"), answer         # the client is told, at once
    assert runner.failed is not None
    raise runner.failed


HISTORY = ("A rolling buffer cache keeps the last W keys and values of every layer, so memory stays bounded while the "
           "sequence grows past the window. Tell me how the slots are chosen.")


def check_chat_reuse(url: str, model_dir: Path, model: str) -> None:
    """A chat's second turn continues from the first turn's prompt (``cached_tokens`` in the streamed usage, the
    /metrics counter) and answers what a cold pre-fill of its whole prompt answers."""
    import openai

    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.pretrained import load

    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": HISTORY}]
    first = c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    hits = metric(httpx.get(url + "/metrics", timeout=30).text, "sirocco_prefix_cache_hit_tokens_total")
    chunks = list(c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    assert metric(httpx.get(url + "/metrics", timeout=30).text,
                  "sirocco_prefix_cache_hit_tokens_total") - hits == first.usage.prompt_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    logprobs = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    loaded = load(str(model_dir))
    [want] = Engine(loaded.model, loaded.tokenizer, max_rows=1).generate(
        [loaded.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=8))
    assert usage.prompt_tokens == len(want.prompt_tokens) and text == want.text
    assert len(logprobs) == len(want.logprobs)
    assert all(abs(a - b) <= 1e-5 for a, b in zip(logprobs, want.logprobs))
