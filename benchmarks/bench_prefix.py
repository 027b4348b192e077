"""A chat's next turn through ``sirocco serve``: the time to the first token of turn 2, which re-sends turn 1's
whole history, against turn 1's, with the prefix store and without it, in the same run.

The checkpoint is bench_serve.py's (random weights with Mistral's v1 tokenizer: the 1B shape in bf16; ``--quick``:
the tiny shape in fp32). Two servers run side by side on 127.0.0.1, each idle while the other answers: one with
its prefix store (``--prefix-cache-mib``, default the server's), one without (0). Each round, on each server:

    turn 1   a conversation of about --history tokens (user and assistant messages of random words, the user's
             last), streamed, greedy: the time to the first token; the answer (--answer-tokens) is kept;
    turn 2   the same messages, the answer and a new user message of a few words: the time to the first token
             and ``usage.prompt_tokens_details.cached_tokens``.

Every round is a new conversation (its first words differ), so its turn 1 is cold on both servers; the servers
take turns going first. Figures: the median over rounds of each time, and of each round's ratios: turn 2 / turn 1
with the store (target <= 0.2), turn 2 with the store / without, turn 1 with the store / without (what storing
costs a cold prompt).

    python benchmarks/bench_prefix.py --quick               # seconds: the tiny shape
    python benchmarks/bench_prefix.py --json > prefix.json  # the 1B shape (about 5 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_serve import FULL, QUICK, ROOT, Server, checkpoint  # noqa: E402

WORDS = ("the window keeps last keys and values of every layer so memory stays bounded while a sequence grows "
         "past it each token attends to those before it inside the window cache rows are reused when requests "
         "finish server streams answers to clients over many turns of one conversation history prompt").split()


def log(msg: str) -> None:
    print(f"bench_prefix: {msg}", file=sys.stderr, flush=True)


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(url: str, tokens: int, seed: int) -> list[dict]:
    """User and assistant messages of random words, the user's last, of about ``tokens`` chat tokens (sized with
    the server's /tokenize)."""
    import httpx

    n = max(8, tokens // 2)
    for _ in range(4):
        rng = random.Random(seed)
        turns = max(1, n // 150)
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": words(max(1, n // turns), rng)}
                    for i in range(2 * turns - 1)]
        count = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=60).json()["count"]
        if abs(count - tokens) <= max(8, tokens // 50):
            break
        n = max(8, round(n * tokens / count))
    return messages


def turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat answer: time to the first token (the first chunk with a token's log-probability), the
    answer's text, and the usage."""
    import httpx

    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text, usage = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                choice = chunk["choices"][0]
                if first is None and choice.get("logprobs"):
                    first = time.perf_counter() - t0
                text.append(choice["delta"].get("content") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert first is not None and usage is not None, "no token or no usage in the stream"
    return {"ttft_s": first, "text": "".join(text), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def chat_round(url: str, messages: list[dict], answer_tokens: int, seed: int) -> dict:
    one = turn(url, messages, answer_tokens)
    follow = messages + [{"role": "assistant", "content": one["text"]},
                         {"role": "user", "content": words(12, random.Random(seed + 1))}]
    two = turn(url, follow, answer_tokens)
    return {"turn1": {k: v for k, v in one.items() if k != "text"}, "turn2": {k: v for k, v in two.items()
                                                                            if k != "text"}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny shape, a short history: seconds")
    p.add_argument("--history", type=int, default=None, help="turn 1's prompt in tokens (default 2500; quick 300)")
    p.add_argument("--answer-tokens", type=int, default=None, help="tokens of each answer (default 32; quick 8)")
    p.add_argument("--rounds", type=int, default=3, help="conversations per server (default 3)")
    p.add_argument("--prefix-cache-mib", type=float, default=None,
                   help="the store of the first server (default: the server's own default)")
    p.add_argument("--chunk-size", type=int, default=None, help="the servers' pre-fill chunk (default: theirs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sirocco-bench",
                   help="where the checkpoint is written once")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on standard output")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from sirocco.cli.options import DEFAULT_PREFIX_CACHE_MIB

    shape = QUICK if args.quick else FULL
    history = args.history or (300 if args.quick else 2500)
    answer_tokens = args.answer_tokens or (8 if args.quick else 32)
    store_mib = DEFAULT_PREFIX_CACHE_MIB if args.prefix_cache_mib is None else args.prefix_cache_mib
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(args.workdir, shape)
    report: dict[str, Any] = {"loadavg_start": os.getloadavg(), "shape": shape, "history_tokens": history,
                              "answer_tokens": answer_tokens, "prefix_cache_mib": store_mib,
                              "chunk_size": args.chunk_size, "rounds": []}
    kinds = {"store": store_mib, "cold": 0.0}
    servers = {k: Server(folder, shape["dtype"], 2, args.chunk_size, threads=args.threads, prefix_cache_mib=mib)
               for k, mib in kinds.items()}
    try:
        for server in servers.values():
            server.wait()
        log(f"warm-up: a {history // 4}-token conversation on each server")
        for kind, server in servers.items():
            chat_round(server.url, conversation(server.url, history // 4, 10**6), answer_tokens, 10**6)
        for i in range(args.rounds):
            row: dict[str, Any] = {}
            order = list(servers) if i % 2 == 0 else list(servers)[::-1]
            for kind in order:
                url = servers[kind].url
                row[kind] = chat_round(url, conversation(url, history, i), answer_tokens, i)
            s, c = row["store"], row["cold"]
            log(f"round {i + 1}: turn 1 ({s['turn1']['prompt_tokens']} tokens) {s['turn1']['ttft_s']:.2f} s, "
                f"turn 2 ({s['turn2']['prompt_tokens']} tokens, {s['turn2']['cached_tokens']} cached) "
                f"{s['turn2']['ttft_s']:.2f} s with the store; {c['turn1']['ttft_s']:.2f} s and "
                f"{c['turn2']['ttft_s']:.2f} s without")
            report["rounds"].append(row)
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)

    def median(kind: str, t: str) -> float:
        return statistics.median(r[kind][t]["ttft_s"] for r in report["rounds"])

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        """The median over rounds of one round's a / b (the two taken a few seconds apart)."""
        return statistics.median(r[a[0]][a[1]]["ttft_s"] / r[b[0]][b[1]]["ttft_s"] for r in report["rounds"])

    summary = {f"{k}_{t}_ttft_s": median(k, t) for k in kinds for t in ("turn1", "turn2")}
    summary["turn2_over_turn1"] = ratio(("store", "turn2"), ("store", "turn1"))
    summary["turn2_store_over_cold"] = ratio(("store", "turn2"), ("cold", "turn2"))
    summary["turn1_store_over_cold"] = ratio(("store", "turn1"), ("cold", "turn1"))
    report["summary"] = summary
    report["loadavg_end"] = os.getloadavg()
    log(f"medians over {args.rounds} rounds: turn 1 {summary['store_turn1_ttft_s']:.2f} s, turn 2 "
        f"{summary['store_turn2_ttft_s']:.2f} s with the store; {summary['cold_turn1_ttft_s']:.2f} s and "
        f"{summary['cold_turn2_ttft_s']:.2f} s without")
    log(f"median of the rounds' ratios: turn 2 / turn 1 with the store {summary['turn2_over_turn1']:.3f} "
        f"(target <= 0.2: {'PASS' if summary['turn2_over_turn1'] <= 0.2 else 'MISS'}); turn 2 with / without the store "
        f"{summary['turn2_store_over_cold']:.3f}; turn 1 with / without {summary['turn1_store_over_cold']:.3f}")
    log(f"load average of the machine (other work included): {report['loadavg_start'][0]:.1f} at the start, "
        f"{report['loadavg_end'][0]:.1f} at the end (2 cores: figures taken above 2 are shared with others)")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
