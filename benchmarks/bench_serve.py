"""``sirocco serve`` under load, against the same prompts run offline through the Engine, in the same run.

A Mistral-shaped checkpoint with random weights is written once into the work folder (default: the 1B shape of
bench_inference.py, dim 2048, 16 layers, 16/4 heads, hidden 7168, vocab 32000, window 4096, bf16; ``--quick``:
dim 256, 4 layers, fp32) with Mistral's v1 tokenizer. Then:

    load     ``sirocco serve`` in a subprocess on 127.0.0.1 (a free port), driven by --concurrency streaming
             clients over the committed mix of benchmarks/serve_mix.json (prompt lengths in random token ids,
             exact output lengths with ignore_eos, greedy). The offline part runs first, then the server.
             Per request: TTFT (first chunk with text), ITL (gaps between text chunks), TPOT ((latency -
             TTFT) / (output tokens - 1), tokens from the usage chunk),
             end-to-end latency; each as mean/p50/p90/p99; requests/s and output tokens/s over the whole run.
    offline  the same prompts and lengths through ``Engine.generate`` in this process, with min(rows,
             concurrency) rows (the most the server can have in flight), before the server starts (so the two
             never share the CPU); both are warmed up first with every prompt for 2 tokens: output tokens/s,
             and the server's share of it.
    padded   the same prompts through transformers' ``generate`` in padded batches of --concurrency requests in
             mix order (left padding, every request of a batch generating the batch's longest output): the
             baseline of a library without continuous batching; its output tokens/s count the tokens asked for.
    single   one streaming client alone against the offline Engine with one row on the same prompt, alternated
             round by round (the server is idle while the offline engine runs, and the other way round): decode
             tokens/s = (output tokens - 1) / (last token - first token), median of the rounds' ratios.
    long     4 streams decoding, then a 2000-token prompt arrives: the 4 streams' inter-token gaps while it is
             pre-filled, with mixed steps (the engine's default: decodes and pre-fill chunks share each step)
             and without (--no-mixed: pre-fill steps until the prompt is cached, the decodes wait).

The targets (the 1B shape in bf16): server throughput >= 0.9x offline and >= 2x transformers' padded batches;
one client >= 0.95x offline batch-1 decode; with mixed steps, the streams' p99 gap while the long prompt is
pre-filled stays near one step of --chunk-size tokens, far below the prompt's whole pre-fill (without them).

The server runs without its prefix store (``--prefix-cache-mib 0``; ``--prefix-cache-mib`` sets it): the warm-up
sends the measured prompts, which a store would keep, and the offline engine has none. Prefix reuse has its own
benchmark, bench_prefix.py.

Every request goes to 127.0.0.1 only; the number of requests is fixed by the mix; the server is stopped at the
end of each part.

    python benchmarks/bench_serve.py --quick            # seconds: the tiny shape
    python benchmarks/bench_serve.py --json > serve.json   # the 1B shape (about 30 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIX = HERE / "serve_mix.json"

FULL = dict(dim=2048, n_layers=16, head_dim=128, hidden_dim=7168, n_heads=16, n_kv_heads=4, vocab_size=32000,
            sliding_window=4096, max_seq_len=4096, dtype="bfloat16")
QUICK = dict(dim=256, n_layers=4, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=2, vocab_size=32000,
             sliding_window=4096, max_seq_len=4096, dtype="float32")


def log(msg: str) -> None:
    print(f"bench_serve: {msg}", file=sys.stderr, flush=True)


# -- the checkpoint --------------------------------------------------------------------------------------------
def checkpoint(workdir: Path, shape: dict) -> Path:
    import mistral_common
    import torch

    from sirocco.checkpoint import save_hf
    from sirocco.config import ModelArgs
    from sirocco.model import build_model

    dtype = shape["dtype"]
    fields = {k: v for k, v in shape.items() if k != "dtype"}
    name = "serve-d{dim}-l{n_layers}-h{n_heads}-kv{n_kv_heads}-f{hidden_dim}".format(**fields)
    folder = workdir / f"{name}-{dtype}-hf"
    if (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file():
        return folder
    log(f"writing {folder.name} (random weights)")
    args = ModelArgs(norm_eps=1e-5, rope_theta=10000.0, **fields)
    torch_dtype = getattr(torch, dtype)
    model = build_model(args, dtype=torch_dtype, seed=0)
    save_hf(model, args, folder, dtype=torch_dtype)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return folder


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(1000, 31000) for _ in range(n - 1)]


# -- statistics --------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else float("nan"), "p50": pct(values, 0.5),
            "p90": pct(values, 0.9), "p99": pct(values, 0.99), "n": len(values)}


def ms(d: dict) -> str:
    return f"mean {d['mean'] * 1e3:.1f} p50 {d['p50'] * 1e3:.1f} p90 {d['p90'] * 1e3:.1f} p99 {d['p99'] * 1e3:.1f} ms"


# -- the server ------------------------------------------------------------------------------------------------
class Server:
    """``sirocco serve`` in a subprocess on 127.0.0.1 at a free port."""

    def __init__(self, folder: Path, dtype: str, max_rows: int, chunk_size: int | None, mixed: bool = True,
                 threads: int | None = None, prefix_cache_mib: float = 0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sirocco.cli", "-q", "serve", "--model", str(folder), "--dtype", dtype,
               "--host", "127.0.0.1", "--port", str(self.port), "--max-rows", str(max_rows), "--max-queue", "1000",
               "--served-model-name", "bench", "--prefix-cache-mib", str(prefix_cache_mib)]
        if chunk_size:
            cmd += ["--chunk-size", str(chunk_size)]
        if not mixed:
            cmd.append("--no-mixed")
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def __enter__(self) -> "Server":
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def stream_one(client, prompt: list[int], max_tokens: int, stop_after: float | None = None) -> dict:
    """One streaming completion: arrival, chunk times, output tokens (from the usage chunk)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if stop_after is not None and time.perf_counter() > stop_after:
                break                                   # hang up: the server aborts the rest
    end = time.perf_counter()
    return {"start": t0, "times": times, "end": end, "tokens": tokens}


async def drive(url: str, jobs: list[tuple[list[int], int]], concurrency: int) -> tuple[list[dict], float]:
    import httpx

    queue = list(enumerate(jobs))
    results: list[Any] = [None] * len(jobs)

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def worker() -> None:
            while queue:
                i, (prompt, m) = queue.pop(0)
                results[i] = await stream_one(c, prompt, m)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def engine_counters(url: str) -> dict:
    """The server's model-step counters (/metrics): busy seconds, steps and their tokens."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for name in ("sirocco_engine_busy_seconds_total", "sirocco_iteration_tokens_count",
                     "sirocco_iteration_tokens_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    return values


def load_figures(results: list[dict], wall: float) -> dict:
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["end"] - r["start"] for r in results]
    tpot = [(r["end"] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["times"] and r["tokens"] > 1]
    out_tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "seconds": wall, "ttft_s": summary(ttft), "tpot_s": summary(tpot),
            "itl_s": summary(itl), "e2e_s": summary(e2e), "requests_per_s": len(results) / wall,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall}


def offline(loaded, jobs: list[tuple[list[int], int]], max_rows: int, chunk_size: int) -> dict:
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams

    engine = Engine(loaded.model, loaded.tokenizer, max_rows=max_rows, chunk_size=chunk_size)
    # warm-up: every prompt for 2 tokens, so first-use costs (lazy torch set-up, kernels) fall outside the timing
    engine.generate([p for p, _ in jobs], SamplingParams(max_tokens=2, stop_on_eos=False))
    params = [SamplingParams(max_tokens=m, stop_on_eos=False) for _, m in jobs]
    busy0 = engine.stats.seconds
    t0 = time.perf_counter()
    done = engine.generate([p for p, _ in jobs], params)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for c in done)
    return {"seconds": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "busy_s": engine.stats.seconds - busy0}


def offline_decode_rate(engine, prompt: list[int], n: int) -> float:
    """Decode tokens/s of one sequence through ``engine`` (one row): (n - 1) / (last token - first token)."""
    from sirocco.generate.sampling import SamplingParams

    times = [time.perf_counter() for _ in engine.stream([prompt], SamplingParams(max_tokens=n, stop_on_eos=False))]
    return (len(times) - 1) / (times[-1] - times[0])


async def served_decode_rate(url: str, prompt: list[int], n: int) -> float:
    """The same through the server, one streaming client: (output tokens - 1) / (last chunk - first chunk)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        r = await stream_one(c, prompt, n)
    return (r["tokens"] - 1) / (r["times"][-1] - r["times"][0])


def transformers_padded(folder: Path, dtype: str, jobs: list[tuple[list[int], int]], batch: int) -> dict:
    """transformers' generate over the jobs in padded batches of ``batch`` (mix order, left padding, each batch
    generating its longest output for every row); output tokens/s count the tokens the requests asked for."""
    import torch
    import transformers
    from transformers import MistralForCausalLM

    transformers.logging.set_verbosity_error()
    model = MistralForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def run(group: list[tuple[list[int], int]]) -> None:
        width = max(len(p) for p, _ in group)
        n = max(m for _, m in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)

    groups = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    run([(p[:16], 2) for p, _ in groups[0]])                                   # warm-up
    t0 = time.perf_counter()
    for g in groups:
        run(g)
    wall = time.perf_counter() - t0
    tokens = sum(m for _, m in jobs)
    return {"seconds": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "attn_implementation": model.config._attn_implementation, "batches": len(groups)}


async def long_prompt_case(url: str, streams: int, stream_prompt: int, long_prompt: int, seed: int) -> dict:
    """``streams`` decoding streams; once each has produced a few chunks, one ``long_prompt``-token prompt
    arrives; the streams hang up a little after it is answered. Their inter-token gaps while it was pending."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        stop_at = [float("inf")]
        tasks = [asyncio.ensure_future(stream_one_until(c, prompt_ids(stream_prompt, seed + 100 + i), stop_at))
                 for i in range(streams)]
        while not all(len(t_times) >= 4 for t_times in _progress(tasks)):
            await asyncio.sleep(0.01)
        t_arrive = time.perf_counter()
        r = await c.post("/v1/completions", json={"model": "bench", "prompt": prompt_ids(long_prompt, seed + 99),
                                                  "max_tokens": 1, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        t_done = time.perf_counter()
        stop_at[0] = t_done + 0.5 * (t_done - t_arrive) + 0.2
        results = await asyncio.gather(*tasks)
    during = [b - a for res in results for a, b in zip(res["times"], res["times"][1:])
              if b > t_arrive and a < t_done]
    before = [b - a for res in results for a, b in zip(res["times"], res["times"][1:]) if b <= t_arrive]
    return {"long_prompt_ttft_s": t_done - t_arrive, "itl_during_s": {**summary(during), "max": max(during or [0])},
            "itl_before_s": summary(before)}


_PROGRESS: dict[int, list[float]] = {}


def _progress(tasks) -> list[list[float]]:
    return [_PROGRESS.get(id(t), []) for t in tasks]


async def stream_one_until(client, prompt: list[int], stop_at: list[float]) -> dict:
    """A long greedy stream that records its chunk times (visible to ``_progress``) until ``stop_at[0]``."""
    task = asyncio.current_task()
    times = _PROGRESS.setdefault(id(task), [])
    body = {"model": "bench", "prompt": prompt, "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
            if time.perf_counter() > stop_at[0]:
                break
    return {"times": list(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny shape and the quick mix: seconds")
    p.add_argument("--concurrency", type=int, default=None, help="streaming clients at once (default 8; quick 4)")
    p.add_argument("--max-rows", type=int, default=8, help="the server's and the offline engine's rows (default 8)")
    p.add_argument("--chunk-size", type=int, default=512, help="pre-fill chunk of both (default 512)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server and the offline run")
    p.add_argument("--prefix-cache-mib", type=float, default=0,
                   help="the server's prefix store (default 0: none, as offline; see above)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the single-client case (default 3)")
    p.add_argument("--single-tokens", type=int, default=None,
                   help="tokens the single client generates (default 128; quick 64)")
    p.add_argument("--requests", type=int, default=None, help="only the first N requests of the mix (default all)")
    p.add_argument("--skip-long", action="store_true", help="leave out the long-prompt case")
    p.add_argument("--skip-transformers", action="store_true", help="leave out transformers' padded batches")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sirocco-bench",
                   help="where the checkpoint is written once")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on standard output")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from sirocco.generate.engine import Engine
    from sirocco.pretrained import load

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    mix_doc = json.loads(MIX.read_text())
    mix = mix_doc["quick" if args.quick else "default"][:args.requests]
    seed = mix_doc["seed"]
    concurrency = args.concurrency or (4 if args.quick else 8)
    single_tokens = args.single_tokens or (64 if args.quick else 128)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(args.workdir, shape)
    jobs = [(prompt_ids(m["prompt_tokens"], seed + i), m["max_tokens"]) for i, m in enumerate(mix)]
    report: dict[str, Any] = {"loadavg_start": os.getloadavg(), "shape": shape, "concurrency": concurrency,
                              "max_rows": args.max_rows, "chunk_size": args.chunk_size,
                              "mix": "quick" if args.quick else "default", "threads": torch.get_num_threads()}
    targets: list[tuple[str, float, str, float]] = []        # (what, measured, ">=" or "<=", bound)

    log("offline: the same prompts through Engine.generate")
    loaded = load(str(folder), dtype=getattr(torch, shape["dtype"]))
    # offline gets as many rows as the server can fill: at most --concurrency sequences are ever in flight there
    report["offline"] = off = offline(loaded, jobs, min(args.max_rows, concurrency), args.chunk_size)
    log(f"  {off['output_tokens_per_s']:.1f} output tokens/s ({off['output_tokens']} tokens in {off['seconds']:.1f} s)")
    solo = Engine(loaded.model, loaded.tokenizer, max_rows=1, chunk_size=args.chunk_size)
    single_prompt = prompt_ids(32, seed + 1000)
    offline_decode_rate(solo, single_prompt, 4)                                    # warm-up

    if not args.skip_transformers:
        log(f"transformers: the same prompts in padded batches of {concurrency}")
        report["transformers_padded"] = tf = transformers_padded(folder, shape["dtype"], jobs, concurrency)
        log(f"  {tf['output_tokens_per_s']:.1f} output tokens/s ({tf['output_tokens']} tokens asked for, "
            f"{tf['batches']} batches in {tf['seconds']:.1f} s)")

    log(f"load: {len(jobs)} requests, {concurrency} concurrent streams, {args.max_rows} rows")
    with Server(folder, shape["dtype"], args.max_rows, args.chunk_size, threads=args.threads,
                prefix_cache_mib=args.prefix_cache_mib) as server:
        asyncio.run(drive(server.url, [(p, 2) for p, _ in jobs], concurrency))        # warm-up, as offline
        c0 = engine_counters(server.url)
        results, wall = asyncio.run(drive(server.url, jobs, concurrency))
        c1 = engine_counters(server.url)
        report["load"] = load_ = load_figures(results, wall)
        load_["busy_s"] = c1["sirocco_engine_busy_seconds_total"] - c0["sirocco_engine_busy_seconds_total"]
        load_["steps"] = c1["sirocco_iteration_tokens_count"] - c0["sirocco_iteration_tokens_count"]
        load_["step_tokens"] = c1["sirocco_iteration_tokens_sum"] - c0["sirocco_iteration_tokens_sum"]
        log(f"  TTFT {ms(load_['ttft_s'])}")
        log(f"  TPOT {ms(load_['tpot_s'])}")
        log(f"  ITL  {ms(load_['itl_s'])}")
        log(f"  {load_['requests_per_s']:.2f} requests/s, {load_['output_tokens_per_s']:.1f} output tokens/s "
            f"({load_['output_tokens']} tokens in {wall:.1f} s)")
        log(f"  the engine was in model steps {load_['busy_s']:.1f} s of the {wall:.1f} s "
            f"({load_['steps']:.0f} steps); "
            f"offline {off['busy_s']:.1f} s of {off['seconds']:.1f} s")
        report["server_over_offline"] = load_["output_tokens_per_s"] / off["output_tokens_per_s"]
        log(f"  the server's output tokens/s are {report['server_over_offline']:.2f}x offline's")
        targets.append((f"server throughput, {concurrency} clients / offline generate", report["server_over_offline"],
                        ">=", 0.9))
        if "transformers_padded" in report:
            report["server_over_transformers"] = (load_["output_tokens_per_s"]
                                                  / report["transformers_padded"]["output_tokens_per_s"])
            log(f"  and {report['server_over_transformers']:.2f}x transformers' padded batches")
            targets.append(("server throughput / transformers padded batches", report["server_over_transformers"],
                            ">=", 2.0))

        log(f"single: one streaming client ({single_tokens} tokens) against the offline engine with one row, "
            f"{args.rounds} rounds alternated")
        asyncio.run(served_decode_rate(server.url, single_prompt, 4))                  # warm-up
        rounds = []
        for i in range(args.rounds):
            a = offline_decode_rate(solo, single_prompt, single_tokens)
            b = asyncio.run(served_decode_rate(server.url, single_prompt, single_tokens))
            rounds.append({"offline_tps": a, "served_tps": b, "ratio": b / a})
            log(f"  round {i + 1}: offline {a:.2f} tokens/s, served {b:.2f} tokens/s: {b / a:.3f}x")
        ratio = statistics.median(r["ratio"] for r in rounds)
        report["single"] = {"tokens": single_tokens, "rounds": rounds, "ratio_median": ratio}
        targets.append(("one client's decode / offline batch-1 decode", ratio, ">=", 0.95))
    del solo, loaded

    if not args.skip_long:
        lp = mix_doc["long_prompt"]["quick" if args.quick else "default"]
        report["long_prompt"] = {}
        for mixed in (True, False):
            name = "mixed" if mixed else "unmixed"
            with Server(folder, shape["dtype"], args.max_rows, args.chunk_size, mixed=mixed,
                        threads=args.threads, prefix_cache_mib=args.prefix_cache_mib) as server:
                asyncio.run(drive(server.url, jobs[:1], 1))
                case = asyncio.run(long_prompt_case(server.url, lp["streams"], lp["stream_prompt_tokens"],
                                                    lp["prompt_tokens"], seed))
            report["long_prompt"][name] = case
            d = case["itl_during_s"]
            log(f"long prompt ({lp['prompt_tokens']} tokens) beside {lp['streams']} streams, {name}: its TTFT "
                f"{case['long_prompt_ttft_s'] * 1e3:.0f} ms; streams' ITL meanwhile {ms(d)}, max "
                f"{d['max'] * 1e3:.1f} ms (before it: p50 {case['itl_before_s']['p50'] * 1e3:.1f} ms)")
        mixed, unmixed = report["long_prompt"]["mixed"], report["long_prompt"]["unmixed"]
        mixed_p99, unmixed_p99 = mixed["itl_during_s"]["p99"], unmixed["itl_during_s"]["p99"]
        whole = unmixed["long_prompt_ttft_s"]
        chunks = -(-lp["prompt_tokens"] // args.chunk_size)
        # one step of the budget: a chunk's share of the whole pre-fill plus the decode step the streams had before
        budget_step = whole / chunks + mixed["itl_before_s"]["p50"]
        report["long_prompt"]["summary"] = {"mixed_p99_s": mixed_p99, "unmixed_p99_s": unmixed_p99,
                                            "whole_prefill_s": whole, "chunks": chunks, "budget_step_s": budget_step}
        log(f"  streams' p99 gap: {mixed_p99 * 1e3:.0f} ms with mixed steps ({mixed_p99 / budget_step:.2f}x one step "
            f"of the budget, {budget_step * 1e3:.0f} ms: a {args.chunk_size}-token chunk plus a decode), "
            f"{unmixed_p99 * 1e3:.0f} ms without ({unmixed_p99 / whole:.2f}x the prompt's whole pre-fill, "
            f"{whole * 1e3:.0f} ms)")
        targets.append(("streams' p99 gap with mixed steps / one step of the budget", mixed_p99 / budget_step,
                        "<=", 1.5))
    report["loadavg_end"] = os.getloadavg()
    report["targets"] = [{"target": t, "measured": v, "op": op, "bound": b, "pass": v >= b if op == ">=" else v <= b}
                         for t, v, op, b in targets]
    for t in report["targets"]:
        log(f"target {t['target']}: {t['measured']:.2f} ({t['op']} {t['bound']}) {'PASS' if t['pass'] else 'MISS'}")
    log(f"load average of the machine (other work included): {report['loadavg_start'][0]:.1f} at the start, "
        f"{report['loadavg_end'][0]:.1f} at the end (2 cores: figures taken above 2 are shared with others)")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
