"""What the chat page's inside panel costs: decode of a request with the panel following it against the same
request without, and decode of another request while a followed one runs beside it, on a real ``sirocco serve``.

The server runs in a subprocess on 127.0.0.1 (a free port) over a bundled model (default sirocco-tiny, whose
steps are short, so that what the panel costs per step weighs the most) or --model. Rounds alternate the cases,
so that a slow phase of the shared host hits each alike:

    solo     one streaming chat request of --tokens tokens (ignore_eos, greedy), followed ("on": an inside
             stream open and named by the request, read by the client as the page would) or not ("off");
             decode tokens/s = 1 / the server's own time per output token for it (the delta of /metrics'
             sirocco_time_per_output_token_seconds over the request). Target: on >= 0.9x off.
    engine   in this process, no HTTP: the engine's decode ms per step for one request with an observer that
             keeps its steps (as the server's does, on the engine's thread) against none, alternated; and what
             recording them costs (viz.inside.RowTrace over batches of 25 steps, as the server's event loop does).
    beside   two requests at once, A never followed, B followed ("on") or not ("off"); they share every step, so
             A's decode is the pair's: tokens/s = 1 / the server's mean time per output token over the two. Target:
             on ~ off (the trace is B's alone; what A pays is B's trace work inside the steps they share).

    python benchmarks/bench_inside.py                  # sirocco-tiny, 5 rounds of 256 tokens
    python benchmarks/bench_inside.py --model sirocco-tiny-moe --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What does the with statement do?"


def log(msg: str) -> None:
    print(f"bench_inside: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "sirocco.cli", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), "--threads", str(threads), "--max-rows", "4"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def tpot(metrics: str) -> tuple[float, float]:
    """(sum, count) of the server's time per output token."""
    values = {}
    for line in metrics.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f"sirocco_time_per_output_token_seconds_{key} "):
                values[key] = float(line.split()[-1])
    return values["sum"], values["count"]


async def chat(client: httpx.AsyncClient, tokens: int, channel: str | None) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if channel is not None:
        body["sirocco_inside"] = channel
    times = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                times.append(time.perf_counter())
    return {"chunks": len(times), "rate": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else 0.0}


async def follow(client: httpx.AsyncClient, channel: str, opened: asyncio.Event, done: asyncio.Event,
                 counts: dict) -> None:
    """Read an inside channel as the page does (every event parsed) until the request it follows ends."""
    async with client.stream("GET", f"/v1/inside/{channel}") as r:
        r.raise_for_status()
        kind = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "steps":
                    counts["step"] = counts.get("step", 0) + len(data["steps"])
                if kind == "open":
                    opened.set()
                elif kind == "end":
                    done.set()
                    return


async def one_round(url: str, tokens: int, round_no: int) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        order = ["off", "on"] if round_no % 2 == 0 else ["on", "off"]
        for case in order:                                     # solo
            counts: dict = {}
            channel = f"bench-{round_no}-{case}-solo"
            follower = None
            if case == "on":
                opened, done = asyncio.Event(), asyncio.Event()
                follower = asyncio.ensure_future(follow(client, channel, opened, done, counts))
                await opened.wait()
            s0, c0 = tpot((await client.get("/metrics")).text)
            await chat(client, tokens, channel if case == "on" else None)
            if follower is not None:
                await follower
            s1, c1 = tpot((await client.get("/metrics")).text)
            assert c1 - c0 == 1
            out[f"solo_{case}"] = 1.0 / (s1 - s0)
            if case == "on":
                out["steps_followed"] = counts.get("step", 0)
                out["events_followed"] = counts.get("steps", 0)
        for case in order:                                     # beside
            channel = f"bench-{round_no}-{case}-beside"
            follower = None
            if case == "on":
                opened, done = asyncio.Event(), asyncio.Event()
                follower = asyncio.ensure_future(follow(client, channel, opened, done, {}))
                await opened.wait()
            s0, c0 = tpot((await client.get("/metrics")).text)
            await asyncio.gather(chat(client, tokens, None), chat(client, tokens, channel if case == "on" else None))
            if follower is not None:
                await follower
            s1, c1 = tpot((await client.get("/metrics")).text)
            assert c1 - c0 == 2
            out[f"beside_{case}"] = 2.0 / (s1 - s0)
    return out


def engine_part(model_name: str, tokens: int, rounds: int) -> dict:
    import collections

    import torch

    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.pretrained import load
    from sirocco.viz.inside import RowTrace

    torch.set_num_threads(1)
    loaded = load(model_name, backend="torch")
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=2)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_on_eos=False)

    class Keep:
        def __init__(self) -> None:
            self.steps: collections.deque = collections.deque()

        def on_row_step(self, step) -> None:
            self.steps.append(step)

    ms: dict[str, list[float]] = {"off": [], "on": []}
    kept = None
    for r in range(rounds + 1):
        for case in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
            observer = Keep() if case == "on" else None
            engine.stats = type(engine.stats)()
            engine.add_request(prompt, params, observer=observer)
            while engine.has_unfinished():
                engine.step()
            if r > 0:                                          # round 0 warms up
                ms[case].append(engine.stats.decode_seconds / engine.stats.decode_steps * 1e3)
            if observer is not None:
                kept = list(observer.steps)
    assert kept is not None
    rt = RowTrace(lambda t: loaded.tokenizer.decode([t]))
    t0 = time.perf_counter()
    for i in range(0, len(kept), 25):
        json.dumps(rt.event(kept[i:i + 25]))
    record = (time.perf_counter() - t0) / len(kept) * 1e3
    ratios = [off / on for off, on in zip(ms["off"], ms["on"], strict=True)]
    return {"decode_ms_off": statistics.median(ms["off"]), "decode_ms_on": statistics.median(ms["on"]),
            "ratio": statistics.median(ratios), "record_ms_per_step": record}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sirocco-tiny", help="a bundled model's name or a folder (default sirocco-tiny)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per answer (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every case, alternated (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="the server's threads (default 1)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on standard output")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    engine = engine_part(a.model, a.tokens, a.rounds)
    log(f"engine: decode {engine['decode_ms_on']:.3f} ms a step observed, {engine['decode_ms_off']:.3f} not: "
        f"{engine['ratio']:.3f}x the rate; recording {engine['record_ms_per_step']:.3f} ms a step (event loop)")
    proc, url = start_server(a.model, a.threads)
    try:
        rounds = []
        asyncio.run(one_round(url, 8, 1))                       # warm-up
        for r in range(a.rounds):
            rounds.append(asyncio.run(one_round(url, a.tokens, r)))
            log(f"round {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()))
    finally:
        proc.terminate()
        proc.wait(30)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    solo = statistics.median(r["solo_on"] / r["solo_off"] for r in rounds)
    beside = statistics.median(r["beside_on"] / r["beside_off"] for r in rounds)
    load = (load_before, os.getloadavg()[0])
    result = {"model": a.model, "tokens": a.tokens, "rounds": rounds, "median": med,
              "solo_ratio": solo, "beside_ratio": beside, "engine": engine, "load_average": load}
    log(f"{a.model}, {a.tokens} tokens, {a.rounds} rounds (medians of the rounds' ratios; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after)")
    log(f"  followed request's decode: {med['solo_on']:.1f} tok/s against {med['solo_off']:.1f} not followed: "
        f"{solo:.3f}x (target >= 0.9x)")
    log(f"  another request's decode beside it: {med['beside_on']:.1f} tok/s against {med['beside_off']:.1f} "
        f"beside one not followed: {beside:.3f}x")
    log(f"  a followed answer's steps: {med['steps_followed']:.0f}, sent in {med['events_followed']:.0f} events")
    log(f"  in the engine alone: {engine['ratio']:.3f}x the decode rate observed; recording "
        f"{engine['record_ms_per_step']:.3f} ms a step against a {engine['decode_ms_off']:.3f} ms decode step")
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
