"""Speculative decoding against plain decoding, in the same run, batch 1: what can be measured honestly here.

No model here can copy a long passage from its prompt (the bundled models were trained briefly with a 64-token
window; random weights agree with nothing), so the parts are:

    bundled   the bundled model's own repetitive greedy continuations: 200 tokens after each REPETITIVE prompt,
              plain decoding against prompt lookup (``--speculate ngram``): tokens/s, the share of the draft
              tokens accepted, and how often a 3-gram lookup over the context (the prompt and the tokens so far)
              predicts the next token of the plain output. Both on the cpu backend (speculation needs its
              kernels; it is also the faster plain decoding of the bundled model); the plain run on the backend
              "auto" picks (the plain PyTorch one, for a model this small) is shown beside them.
    sampled   open-ended text at temperature 0.8 (OPEN prompts, 200 tokens, seeded): prompt lookup must not cost
              where it does not help. The tokens must be the same as plain decoding's (a one-hot draft is
              verified with the draws of plain sampling).
    cost      the 1B Mistral shape of bench_inference (random weights; bf16 and int4, each format in its own
              process): the time of one step that verifies k = 1 .. 7 proposed tokens of one row (k + 1 tokens:
              a step with drafts carries at most 8, the row-exact kernels' largest row count), against a plain
              step; then tokens/s of a greedy run with a drafter that proposes the run's own greedy continuation,
              each token right with probability p (``KnownDrafter``), at k = 4, against plain decoding: the curve a
              real drafter's acceptance rate lands on.
    peer      with --llama-cpp DIR (a llama.cpp build's bin folder, not built here): the bundled model as one GGUF
              file (q8_0, written by ``sirocco quantize``), run by sirocco (plain and prompt lookup) and by
              llama.cpp's server (plain and ``--spec-type ngram-simple``, 3-gram lookup, 4-token drafts) on
              127.0.0.1, the same prompts and greedy tokens count: tokens/s of each.

Every speculative run's greedy tokens are checked equal to plain decoding's (a mismatch fails the run). Timings
alternate plain and speculative runs, one warm-up each, and take the median of --repeats. The machine is
shared: the report gives the load average at the start and the end of each part.

    python benchmarks/bench_speculate.py                          # every part but peer (about 10 minutes)
    python benchmarks/bench_speculate.py --parts bundled,sampled  # the bundled model only (about a minute)
    python benchmarks/bench_speculate.py --llama-cpp /work/peers/llama.cpp/build/bin --parts peer
    python benchmarks/bench_speculate.py --quick                  # small shapes and counts: a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_inference import FULL, QUICK, build_checkpoints, checkpoint_dir, random_prompts  # noqa: E402
from bench_inference import spawn as run_worker  # noqa: E402

PARTS = ("bundled", "sampled", "cost", "peer")
REPETITIVE = ["+-------+-------+", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "The with statement"]
OPEN = ["Return a new dictionary", "The sliding window", "A module is"]
PROBABILITIES = (1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)
TARGETS = {"bundled": 1.8, "sampled": 0.97, "int4_k4_all_right": 2.5}
DTYPE = "bfloat16"


# -- measuring -------------------------------------------------------------------------------------------------
def alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list]:
    """Each run once untimed, then ``repeats`` rounds of every run in turn; per run, its results."""
    out: dict[str, list] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            out[name].append(fn())
    return out


def generation(engine, prompt, params) -> Callable[[], dict]:
    """A run of ``engine`` over one prompt: wall tokens/s (pre-fill of the short prompt included), the tokens, and
    the engine's draft counts."""
    from sirocco.generate.engine import Stats

    def run() -> dict:
        engine.stats = Stats()
        t0 = time.perf_counter()
        [c] = engine.generate([prompt], params)
        dt = time.perf_counter() - t0
        return {"tokens_per_s": len(c.tokens) / dt, "tokens": c.tokens, "logprobs": c.logprobs,
                "proposed": engine.stats.proposed_tokens, "accepted": engine.stats.accepted_tokens}
    return run


def summary(runs: list[dict]) -> dict:
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "runs_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs],
            "proposed": runs[-1]["proposed"], "accepted": runs[-1]["accepted"]}


def lookup_hits(prompt: list[int], generated: list[int], n: int) -> float:
    """The share of ``generated`` that an n-gram lookup over the context before each token predicts."""
    from sirocco.generate.drafters import NgramIndex
    index = NgramIndex(n)
    index.extend(prompt)
    hits = 0
    for t in generated:
        hits += index.propose(1, min_n=n) == [t]
        index.extend([t])
    return hits / len(generated)


def bundled_part(a: argparse.Namespace, sampled: bool) -> dict:
    """The bundled model: REPETITIVE greedy (or OPEN sampled), plain against prompt lookup."""
    import torch

    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.generate.speculation import Speculation
    from sirocco.pretrained import load
    torch.set_num_threads(a.threads)
    fast, reference = load(a.model, backend="cpu"), load(a.model, backend="auto")   # two copies, two backends
    tok = fast.tokenizer
    n = 40 if a.quick else 200
    plain = Engine(fast.model, tok, max_rows=1)
    spec = Engine(fast.model, tok, max_rows=1, speculation=Speculation("ngram", draft_tokens=a.draft_tokens,
                                                                         ngram=a.ngram))
    auto = Engine(reference.model, tok, max_rows=1)
    out: dict[str, Any] = {"load_average_start": os.getloadavg()[0], "backend_auto": auto.backend,
                           "cost_curve": [round(c / spec.speculator.cost[0], 3) for c in spec.speculator.cost]}
    rows = []
    for i, text in enumerate(OPEN if sampled else REPETITIVE):
        params = (SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=i, stop_on_eos=False) if sampled
                  else SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False))
        ids = tok.encode(text, bos=True, eos=False)
        res = alternate({"plain": generation(plain, ids, params), "speculative": generation(spec, ids, params),
                         "plain_auto": generation(auto, ids, params)}, a.repeats)
        same = all(r["tokens"] == res["plain"][0]["tokens"] and r["logprobs"] == res["plain"][0]["logprobs"]
                   for r in res["speculative"])
        if not same:
            raise SystemExit(f"speculative output differs from plain decoding's for {text!r}")
        row = {"prompt": text, **{k: summary(v) for k, v in res.items()},
               "lookup_3gram_hits": lookup_hits(ids, res["plain"][0]["tokens"], 3), "same_output": same,
               "text": tok.decode(res["plain"][0]["tokens"])[:60]}
        row["ratio"] = row["speculative"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        rows.append(row)
    out["rows"] = rows
    out["load_average_end"] = os.getloadavg()[0]
    return out


# -- the 1B shape, one format per process ------------------------------------------------------------------------
def cost_worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(HERE))
    from bench_quant import load_format
    from sirocco import backends
    from sirocco.generate.drafters import KnownDrafter
    from sirocco.generate.engine import Engine, Stats
    from sirocco.generate.sampling import SamplingParams
    from sirocco.generate.speculation import ROW_EXACT_TOKENS, Speculation
    fmt, reps, quick = spec["format"], spec["repeats"], spec["quick"]
    out: dict[str, Any] = {"format": fmt, "load_average_start": os.getloadavg()[0]}
    model, _ = load_format(Path(spec["path"]), fmt)
    backends.attach(model, "cpu")                    # speculation needs the cpu backend; plain decoding runs it too
    vocab = model.args.vocab_size
    context, n = (16, 16) if quick else (64, 48)
    [prompt] = random_prompts([context], vocab, seed=5)
    params = SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)
    plain = Engine(model, None, max_rows=1, max_seq_len=context + n + 16)

    # one step of k + 1 tokens of one row at position `context` (after the prompt's pre-fill): rounds over every
    # count in turn (a busy moment of the host falls on one reading of each), the best reading of each kept
    plain.generate([prompt], SamplingParams(max_tokens=1, stop_on_eos=False))
    plans = [model.plan([t], starts=[context], rows=[0], cache=plain.cache, decode=1)
             for t in range(1, ROW_EXACT_TOKENS + 1)]
    steps = [float("inf")] * ROW_EXACT_TOKENS
    with torch.inference_mode():
        for round_ in range(reps + 3):
            for i, plan in enumerate(plans):
                t0 = time.perf_counter()
                model(torch.tensor(prompt[:i + 1]), plan, plain.cache)
                if round_:
                    steps[i] = min(steps[i], time.perf_counter() - t0)
    out["step_seconds"] = steps                     # index i: a step of i + 1 tokens (k = i proposed)

    # the greedy continuation, then tokens/s against the chance p that each proposed token is right, at k = 4
    def run(engine) -> Callable[[], dict]:
        def once() -> dict:
            engine.stats = Stats()
            [c] = engine.generate([prompt], params)
            s = engine.stats
            return {"tokens_per_s": s.decode_tps, "tokens": c.tokens, "proposed": s.proposed_tokens,
                    "accepted": s.accepted_tokens}
        return once
    reference = run(plain)()["tokens"]
    runs: dict[str, Callable[[], dict]] = {"plain": run(plain)}
    curve = None                                     # measured by the first engine, handed to the others
    for p in spec["probabilities"]:
        drafter = KnownDrafter({tuple(prompt): reference}, vocab, p=p, seed=11)
        engine = Engine(model, None, max_rows=1, max_seq_len=context + n + 16,
                        speculation=Speculation(drafter, draft_tokens=4, cost_curve=curve))
        curve = out["measured_cost_curve"] = engine.speculator.cost
        runs[f"p={p}"] = run(engine)
    res = alternate(runs, reps)
    for name, rs in res.items():
        if any(r["tokens"] != reference for r in rs):
            raise SystemExit(f"{fmt} {name}: speculative tokens differ from plain decoding's")
    out["runs"] = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                          "runs_tokens_per_s": [round(r["tokens_per_s"], 2) for r in rs],
                          "proposed": rs[-1]["proposed"], "accepted": rs[-1]["accepted"]}
                   for name, rs in res.items()}
    out["load_average_end"] = os.getloadavg()[0]
    return out


def cost_part(a: argparse.Namespace, log: Callable[[str], None]) -> dict:
    shape = (QUICK if a.quick else FULL)[0]
    base = dict(threads=a.threads, repeats=a.repeats, quick=a.quick)
    built = run_worker(dict(base, what="build", workdir=str(a.workdir.resolve())), log, script=Path(__file__),
                       label="checkpoint")
    if "error" in built:
        return {"error": built["error"]}
    path = str(checkpoint_dir(a.workdir.resolve(), shape, DTYPE))
    out: dict[str, Any] = {"shape": shape.name}
    for fmt in ("bf16", "int4"):
        log(f"cost: {fmt} ...")
        out[fmt] = run_worker(dict(base, what="cost", format=fmt, path=path, probabilities=list(PROBABILITIES)),
                              log, script=Path(__file__), label=f"cost {fmt}")
    return out


# -- llama.cpp on the same GGUF ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(bin_dir: Path, gguf: Path, threads: int, lookup: bool, prompts: list[str], n: int,
                 repeats: int) -> list[dict]:
    """tokens/s of llama.cpp's server over each prompt (greedy, ``n`` tokens), its own timing of the generation."""
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t",
           str(threads), "-c", "1024", "-np", "1"]
    if lookup:
        cmd += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m",
                "4", "--spec-draft-n-max", "4"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        out = []
        for text in prompts:
            body = json.dumps({"prompt": text, "n_predict": n, "temperature": 0, "cache_prompt": False,
                               "ignore_eos": True}).encode()
            runs = []
            for i in range(repeats + 1):
                req = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type":
                                                                                    "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    d = json.loads(r.read())
                if i:
                    runs.append(d)
            t = [d["timings"]["predicted_per_second"] for d in runs]
            last = runs[-1]["timings"]
            out.append({"prompt": text, "tokens_per_s": statistics.median(t), "runs_tokens_per_s": t,
                        "draft": last.get("draft_n"), "accepted": last.get("draft_n_accepted")})
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def peer_part(a: argparse.Namespace, log: Callable[[str], None]) -> dict:
    import torch

    from sirocco.cli import main as sirocco
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.generate.speculation import Speculation
    from sirocco.pretrained import load
    torch.set_num_threads(a.threads)
    n = 40 if a.quick else 200
    out: dict[str, Any] = {"load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "bundled-q8_0.gguf"
        if sirocco(["-q", "quantize", a.model, str(gguf), "--type", "q8_0", "--no-progress"]):
            return {"error": "sirocco quantize failed"}
        loaded = load(str(gguf), backend="cpu")
        tok = loaded.tokenizer
        plain = Engine(loaded.model, tok, max_rows=1)
        spec = Engine(loaded.model, tok, max_rows=1, speculation=Speculation("ngram", draft_tokens=4, ngram=3))
        params = SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)
        rows = []
        for text in REPETITIVE:
            ids = tok.encode(text, bos=True, eos=False)
            res = alternate({"plain": generation(plain, ids, params), "speculative": generation(spec, ids, params)},
                            a.repeats)
            rows.append({"prompt": text, **{k: summary(v) for k, v in res.items()}})
        out["sirocco"] = rows
        log("peer: llama.cpp plain and with prompt lookup ...")
        out["llama_cpp"] = {"plain": llama_server(a.llama_cpp, gguf, a.threads, False, REPETITIVE, n, a.repeats),
                            "lookup": llama_server(a.llama_cpp, gguf, a.threads, True, REPETITIVE, n, a.repeats)}
    out["load_average_end"] = os.getloadavg()[0]
    return out


# -- the report ----------------------------------------------------------------------------------------------------
def check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: dict, a: argparse.Namespace) -> tuple[list[str], list[dict]]:
    lines: list[str] = []
    targets: list[dict] = []
    for part, title in (("bundled", "repetitive continuations, greedy"), ("sampled", "open-ended, temperature 0.8")):
        if part not in res:
            continue
        r = res[part]
        lines += [f"Bundled model {a.model}, {title}, batch 1, {a.threads} threads, load average "
                  f"{r['load_average_start']:.2f} -> {r['load_average_end']:.2f}; prompt lookup up to "
                  f"{a.draft_tokens} draft tokens, n-grams {a.ngram}..1; step cost at 1..8 tokens "
                  f"{' '.join(f'{c:.2f}' for c in r['cost_curve'])} x one:", "",
                  "| prompt | 3-gram lookup hits | plain, auto backend (tok/s) | plain, cpu (tok/s) | "
                  "prompt lookup (tok/s) | drafts accepted | speed-up | same tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            s = row["speculative"]
            share = f"{s['accepted']}/{s['proposed']}" if s["proposed"] else "0/0"
            lines.append(f"| `{row['prompt']}` | {row['lookup_3gram_hits']:.0%} | "
                         f"{row['plain_auto']['tokens_per_s']:.0f} | {row['plain']['tokens_per_s']:.0f} | "
                         f"{s['tokens_per_s']:.0f} | {share} | {row['ratio']:.2f}x | {row['same_output']} |")
        lines.append("")
        if part == "bundled":
            for row in r["rows"][:2]:
                targets.append({"target": f"prompt lookup >= {TARGETS['bundled']}x plain on `{row['prompt']}`",
                                "measured": row["ratio"], "pass": row["ratio"] >= TARGETS["bundled"]})
        else:
            worst = min(row["ratio"] for row in r["rows"])
            targets.append({"target": f"sampled text: prompt lookup >= {TARGETS['sampled']}x plain (worst prompt)",
                            "measured": worst, "pass": worst >= TARGETS["sampled"]})
    if "cost" in res and "error" not in res["cost"]:
        c = res["cost"]
        lines += [f"The {c['shape']} shape, random weights, batch 1, {a.threads} threads: one step verifying k "
                  "proposed tokens of one row (k + 1 tokens), against a plain step:", "",
                  "| format | " + " | ".join(f"k = {k}" for k in range(1, 8)) + " |",
                  "|---|" + "---|" * 7]
        for fmt in ("bf16", "int4"):
            f = c.get(fmt, {})
            if "step_seconds" in f:
                base = f["step_seconds"][0]
                lines.append(f"| {fmt} | " + " | ".join(f"{t / base:.2f}x" for t in f["step_seconds"][1:]) + " |")
        lines += ["", "Tokens/s of greedy decoding with drafts of the run's own continuation, each token right with "
                  "probability p, up to k = 4 per step (the engine's rule choosing how many), against plain:", "",
                  "| format | plain (tok/s) | " + " | ".join(f"p = {p}" for p in PROBABILITIES) + " |",
                  "|---|---|" + "---|" * len(PROBABILITIES)]
        for fmt in ("bf16", "int4"):
            f = c.get(fmt, {})
            if "runs" not in f:
                lines.append(f"| {fmt} | failed: {f.get('error', '?')[:60]} |")
                continue
            p0 = f["runs"]["plain"]["tokens_per_s"]
            cells = [f"{f['runs'][f'p={p}']['tokens_per_s']:.1f} ({f['runs'][f'p={p}']['tokens_per_s'] / p0:.2f}x)"
                     for p in PROBABILITIES]
            lines.append(f"| {fmt} | {p0:.1f} | " + " | ".join(cells) + " |")
            if fmt == "int4":
                ratio = f["runs"]["p=1.0"]["tokens_per_s"] / p0
                targets.append({"target": f"int4, k = 4, every draft right: >= {TARGETS['int4_k4_all_right']}x "
                                          "plain", "measured": ratio, "pass": ratio >= TARGETS["int4_k4_all_right"]})
        lines += ["", "load average per format: " + ", ".join(
            f"{fmt} {c[fmt]['load_average_start']:.2f} -> {c[fmt]['load_average_end']:.2f}"
            for fmt in ("bf16", "int4") if "load_average_start" in c.get(fmt, {})), ""]
    if "peer" in res and "error" not in res["peer"]:
        p = res["peer"]
        lines += [f"The same GGUF file (the bundled model in q8_0), greedy, {a.threads} threads, load average "
                  f"{p['load_average_start']:.2f} -> {p['load_average_end']:.2f}:", "",
                  "| prompt | sirocco plain | sirocco prompt lookup | llama.cpp plain | llama.cpp ngram-simple |",
                  "|---|---|---|---|---|"]
        for s, lp, ll in zip(p["sirocco"], p["llama_cpp"]["plain"], p["llama_cpp"]["lookup"], strict=True):
            lines.append(f"| `{s['prompt']}` | {s['plain']['tokens_per_s']:.0f} | "
                         f"{s['speculative']['tokens_per_s']:.0f} ({s['speculative']['accepted']}/"
                         f"{s['speculative']['proposed']}) | {lp['tokens_per_s']:.0f} | {ll['tokens_per_s']:.0f} "
                         f"({ll['accepted']}/{ll['draft']}) |")
        lines.append("")
    if targets:
        lines += ["| target | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']:.2f}x | {check(t['pass'])} |" for t in targets]
    return lines, targets


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bundled,sampled,cost", help="comma-separated, from: " + ", ".join(PARTS))
    ap.add_argument("--model", default="sirocco-tiny", help="the bundled model of the bundled, sampled and peer parts")
    ap.add_argument("--quick", action="store_true", help="small shapes and counts: a smoke test of the script")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and llama.cpp's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after a warm-up")
    ap.add_argument("--draft-tokens", type=int, default=4, help="prompt lookup's most draft tokens per step")
    ap.add_argument("--ngram", type=int, default=3, help="prompt lookup's longest n-gram")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp build's bin folder (llama-server), for the peer part")
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache", help="where the 1B checkpoint is written")
    ap.add_argument("--json", action="store_true", help="print one JSON document with every figure to stdout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in a.parts if p not in PARTS]
    if bad or not a.parts:
        ap.error(f"--parts: {bad or 'nothing'} not in {', '.join(PARTS)}")
    if "peer" in a.parts and (a.llama_cpp is None or not (a.llama_cpp / "llama-server").exists()):
        ap.error("--parts peer needs --llama-cpp DIR holding llama-server")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        shape = (QUICK if spec["quick"] else FULL)[0]
        out = (build_checkpoints(Path(spec["workdir"]), shape, [DTYPE]) or {}) if spec["what"] == "build" \
            else cost_worker(spec)
        Path(a.result).write_text(json.dumps(out))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if os.getloadavg()[0] > 1.0:
        log(f"warning: load average {os.getloadavg()[0]:.2f} before starting: other work slows these figures")
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    for part in a.parts:
        log(f"{part} ...")
        if part in ("bundled", "sampled"):
            res[part] = bundled_part(a, sampled=part == "sampled")
        elif part == "cost":
            res[part] = cost_part(a, log)
        else:
            res[part] = peer_part(a, log)
    lines, targets = report(res, a)
    lines.append(f"\nrun: {(time.perf_counter() - t0) / 60:.1f} min")
    log("\n".join(lines))
    if a.json:
        print(json.dumps({"results": res, "targets": targets, "threads": a.threads, "repeats": a.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
