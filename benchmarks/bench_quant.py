"""sirocco's bf16, int8 and int4 weights in one run, on the same weights: decode, pre-fill, the bandwidth bound,
peak memory, and perplexity.

The checkpoint is bench_inference.py's: a Mistral shape with random weights (dim 2048, 16 layers, 16 heads, 4 kv
heads, hidden 7168, vocab 32000: about 1.0B parameters), written once in bf16 by transformers into the work
folder. Each format runs in its own fresh subprocess, so that its peak memory is its own:

    bf16   the checkpoint loaded in bfloat16
    int8   the same with each linear weight quantized to GGUF's q8_0 as it is read (``checkpoint.load_quantized``,
           what --quantize int8 does: the float model never exists whole)
    int4   the same to q4_0 (the output head q8_0 in both)

In that process, in this order:

    bandwidth   the read bandwidth before loading: sums of a 1 GiB fp32 tensor (256 MiB if --quick) in 16 MiB
                chunks, one pass timed whole, best of 3 passes (also the fastest single chunk), once in ordinary
                memory and once in huge-page memory (hugepages.py, where the quantized blocks live: it reads
                faster), the better of the two kept; freed again, and the peak-memory mark reset, before the
                model loads
    load        peak resident memory (VmHWM minus the resident size before loading), seconds to load and to
                quantize, then again after a first generated token (memory-mapped weights count once touched)
    pre-fill    a 512-token prompt to its first token (generate one token): tokens/s
    decode      1 row and 8 rows: a 16-token prompt per row, 64 new tokens each, greedy with no EOS stop; the
                engine's own decode-step time (engine.stats: pre-fill excluded): generated tokens/s, and steps/s
    bandwidth   measured again after the timing, with the model freed

The bytes a decode step reads are the model's tensors (QuantLinear's qweight blocks, every float tensor) minus
the embedding table, of which a step reads one row, and minus the experts a MoE layer's rows cannot all reach: a
step of R rows reads at most min(E, R * k) of a layer's E experts. The decode bound is bandwidth / those bytes, in
steps/s: a 1-row step makes 1 token, an 8-row step 8 tokens from the same weight read. The bandwidth used is the
best of the format's own two measurements; the best of the whole run is reported too.

Perplexity, in one more subprocess per format: the bundled models (sirocco-tiny, sirocco-tiny-moe), loaded in
bf16 and quantized the same way, on their validation text (``load_corpus("default")``'s validation documents,
each ``<s> ids </s>`` as training tokenizes them, concatenated, the first 20,000 tokens), context 256, stride 128.

Timings exclude a warm-up run and are medians of --repeats runs. The machine should be otherwise idle: the run
reports the load average and the share of the CPUs other processes used while it ran.

    python benchmarks/bench_quant.py                 # the 1B shape (about 15-20 minutes on 2 cores)
    python benchmarks/bench_quant.py --quick         # a small shape, seconds: a smoke test
    python benchmarks/bench_quant.py --moe           # the Mixtral shape of bench_inference --moe
    python benchmarks/bench_quant.py --json > quant.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_inference import (  # noqa: E402  (the checkpoint, its shape and the process facts are shared)
    FULL,
    MOE,
    MOE_QUICK,
    QUICK,
    Shape,
    build_checkpoints,
    busy_jiffies,
    checkpoint_dir,
    own_cpu_seconds,
    proc_status_kib,
    random_prompts,
)
from bench_inference import spawn as run_worker  # noqa: E402

FORMATS = ("bf16", "int8", "int4")
PPL_MODELS = ("sirocco-tiny", "sirocco-tiny-moe")
DTYPE = "bfloat16"                      # the checkpoint bench_inference writes, and what every format loads


@dataclass(frozen=True)
class Workload:
    prefill_len: int        # the pre-fill prompt
    decode_prompt: int      # prompt tokens per row for decode
    decode_tokens: int      # new tokens per row
    rows: tuple             # decode batch sizes
    ppl_tokens: int         # validation tokens scored per bundled model
    ppl_context: int
    ppl_stride: int
    bandwidth_mib: int      # the buffer the bandwidth is read from


WORK = {False: (FULL[0], Workload(512, 16, 64, (1, 8), 20_000, 256, 128, 1024)),
        True: (QUICK[0], Workload(64, 8, 16, (1, 8), 2_000, 256, 128, 256))}
# --moe: bench_inference's Mixtral shape (dim 1024, 8 layers, 16/4 heads, 8 experts of 3584, top 2), same workload
MOE_WORK = {False: (MOE[0], WORK[False][1]), True: (MOE_QUICK[0], WORK[True][1])}


def work_for(spec: dict) -> tuple[Shape, Workload]:
    return (MOE_WORK if spec.get("moe") else WORK)[spec["quick"]]
CHUNK_MIB = 16


# -- the read bandwidth --------------------------------------------------------------------------------------------
def read_bandwidth(mib: int, passes: int = 3) -> dict:
    """``read_bandwidth_of`` an ordinary tensor and of one in huge-page memory, and the better of each figure."""
    import torch

    from sirocco.backends.quant.hugepages import huge_page_tensors
    plain = read_bandwidth_of(torch.ones(mib * 2**20 // 4), passes)
    [area] = huge_page_tensors([(mib * 2**20,)])
    huge = read_bandwidth_of(area.view(torch.float32).fill_(1.0), passes)
    del area
    return {key: max(plain[key], huge[key]) for key in plain} | {"plain": plain, "huge_pages": huge}


def read_bandwidth_of(values, passes: int) -> dict:
    """Bytes/s of a sum over an fp32 tensor chunk by chunk (16 MiB each, in turn, so each comes from memory): the
    best whole pass of ``passes`` (after one untimed pass), and the fastest single chunk."""
    mib = values.numel() * 4 // 2**20
    chunks = values.chunk(mib // CHUNK_MIB)
    del values
    for c in chunks:
        c.sum()
    best_pass, best_chunk = float("inf"), float("inf")
    for _ in range(passes):
        t_pass = time.perf_counter()
        for c in chunks:
            t0 = time.perf_counter()
            c.sum()
            best_chunk = min(best_chunk, time.perf_counter() - t0)
        best_pass = min(best_pass, time.perf_counter() - t_pass)
    del chunks
    return {"pass_bytes_per_s": mib * 2**20 / best_pass, "chunk_bytes_per_s": CHUNK_MIB * 2**20 / best_chunk}


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- one format, in this process -------------------------------------------------------------------------------------
def decode_read_bytes(model, rows: tuple[int, ...]) -> tuple[int, dict[int, int]]:
    """(bytes of every parameter and buffer, {rows: the bytes a step of that many rows reads at most}): every
    tensor but the embedding table, and of a MoE layer's experts only min(E, rows * k), the most that many rows can
    choose."""
    from sirocco.backends.quant.convert import model_bytes
    from sirocco.model.transformer import MoeFeedForward
    total = model_bytes(model)
    emb = model.tok_embeddings.weight
    dense = total - emb.numel() * emb.element_size()
    moes = [m for m in model.modules() if isinstance(m, MoeFeedForward)]
    read = {}
    for r in rows:
        unread = sum((len(m.experts) - min(len(m.experts), r * m.k)) * (model_bytes(m.experts) // len(m.experts))
                     for m in moes)
        read[r] = dense - unread
    return total, read


def load_format(path: Path, fmt: str) -> tuple[Any, dict]:
    """The checkpoint in bf16, or quantized to ``fmt`` while it is read; what quantizing did."""
    import torch

    from sirocco.checkpoint import load_model, load_quantized
    if fmt == "bf16":
        return load_model(path, dtype=torch.bfloat16, device="cpu", progress=False), {}
    model, report = load_quantized(path, fmt, dtype=torch.bfloat16, device="cpu", progress=False)
    return model, {"quantized_layers": report.layers, "kept_in_float": report.kept}


def median_run(fn: Callable[[], Any], repeats: int) -> list:
    fn()                                            # warm-up
    return [fn() for _ in range(repeats)]


def run_format(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from sirocco import backends
    from sirocco.generate.engine import Engine, Stats
    from sirocco.generate.sampling import SamplingParams
    shape, work = work_for(spec)
    fmt, reps = spec["format"], spec["repeats"]
    out: dict[str, Any] = {"format": fmt, "load_average_start": os.getloadavg()[0]}
    out["bandwidth_before"] = read_bandwidth(work.bandwidth_mib)

    out["peak_reset"] = reset_peak()
    rss0 = proc_status_kib("VmRSS")
    out["imports_rss_bytes"] = rss0 * 1024
    t0 = time.perf_counter()
    model, done = load_format(Path(spec["path"]), fmt)
    out["load_seconds"] = time.perf_counter() - t0                # reading and quantizing are one pass
    out.update(done)
    out["load_peak_bytes"] = (proc_status_kib("VmHWM") - rss0) * 1024
    out["model_bytes"], by_rows = decode_read_bytes(model, work.rows)
    out["decode_read_bytes"] = {str(r): b for r, b in by_rows.items()}
    out["auto_backend"] = backends.choose(model, "auto")

    def engine(rows: int, seq: int, model=model):
        return Engine(model, None, max_rows=rows, max_seq_len=seq)

    t0 = time.perf_counter()
    backends.attach(model, spec["backend"])
    e_pre = engine(1, work.prefill_len + 2)
    e_dec = {r: engine(r, work.decode_prompt + work.decode_tokens + 1) for r in work.rows}
    out["engines_seconds"] = time.perf_counter() - t0
    out["backend"] = e_pre.backend

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)

    e_dec[1].generate(random_prompts([8], shape.vocab_size, seed=4), greedy(1))
    out["first_token_peak_bytes"] = (proc_status_kib("VmHWM") - rss0) * 1024
    out["rss_after_first_token_bytes"] = (proc_status_kib("VmRSS") - rss0) * 1024

    # pre-fill: a 512-token prompt to its first token, wall time
    [prompt] = random_prompts([work.prefill_len], shape.vocab_size, seed=1)

    def prefill(e_pre=e_pre) -> float:
        t = time.perf_counter()
        e_pre.generate([prompt], greedy(1))
        return time.perf_counter() - t
    times = median_run(prefill, reps)
    out["prefill"] = {"seconds": times, "tokens_per_s": work.prefill_len / statistics.median(times)}

    # decode: the engine's decode-step time only
    for rows, eng in e_dec.items():
        prompts = random_prompts([work.decode_prompt] * rows, shape.vocab_size, seed=2)

        def decode(eng=eng, prompts=prompts) -> dict:
            eng.stats = Stats()
            done = eng.generate(prompts, greedy(work.decode_tokens))
            s = eng.stats
            return {"tokens_per_s": s.decode_tps, "steps_per_s": s.decode_steps / s.decode_seconds,
                    "tokens": [c.tokens for c in done]}
        runs = median_run(decode, reps)
        out[f"decode_{rows}"] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                                 "steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
                                 "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
                                 "tokens": runs[-1]["tokens"][0][:16]}
    out["run_peak_bytes"] = (proc_status_kib("VmHWM") - rss0) * 1024
    del e_pre, e_dec, model
    import gc
    gc.collect()
    out["bandwidth_after"] = read_bandwidth(work.bandwidth_mib)
    out["bandwidth_bytes_per_s"] = max(out["bandwidth_before"]["pass_bytes_per_s"],
                                       out["bandwidth_after"]["pass_bytes_per_s"])
    out["load_average_end"] = os.getloadavg()[0]
    return out


def validation_tokens(tokenizer, tokenizer_file: Path, n: int, workdir: Path) -> list[int]:
    """The first ``n`` tokens of the default corpus's validation documents, each ``<s> ids </s>`` (train/data.py's
    tokenize), concatenated in the corpus's order; cached in the work folder by the tokenizer file's hash."""
    import hashlib
    digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:16]
    cached = workdir / f"val-tokens-{digest}-{n}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from sirocco.train.corpus import load_corpus
    from sirocco.train.data import tokenize
    from sirocco.train.recipe import DataRecipe
    d = DataRecipe()
    corpus = load_corpus(d.corpus, d.val_fraction, d.min_chars)
    ids: list[int] = []
    for doc in corpus.val:
        ids += tokenize([doc.text], tokenizer)[0]
        if len(ids) >= n:
            break
    ids = ids[:n]
    workdir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(ids))
    return ids


def run_perplexity(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from sirocco.eval import perplexity
    from sirocco.pretrained import load, model_folder
    _, work = work_for(spec)
    out: dict[str, Any] = {"format": spec["format"]}
    for name in PPL_MODELS:
        fmt = spec["format"]
        loaded = load(name, dtype=torch.bfloat16, quantize=None if fmt == "bf16" else fmt)
        tok_file = model_folder(name) / "tokenizer.model"
        ids = validation_tokens(loaded.tokenizer, tok_file, work.ppl_tokens, Path(spec["workdir"]))
        t0 = time.perf_counter()
        r = perplexity(loaded.model, ids, work.ppl_context, work.ppl_stride, progress=False)
        out[name] = dict(r.to_json(), seconds=time.perf_counter() - t0)
    return out


# -- the subprocesses ------------------------------------------------------------------------------------------------
def spawn(spec: dict, log: Callable[[str], None]) -> dict:
    """One worker of this script in a new Python process (bench_inference's runner)."""
    return run_worker(spec, log, script=Path(__file__), label=f"{spec['what']} {spec.get('format', '')}")


# -- the report ------------------------------------------------------------------------------------------------------
def report(res: dict, ppl: dict, shape: Shape, work: Workload, run_best_bw: float) -> list[str]:
    ok = {f: r for f, r in res.items() if "error" not in r}
    gb = 1e9

    def num(x, digits=1, unit=""):
        return "–" if x is None else f"{x:,.{digits}f}{unit}"

    def ratio(f, key):
        if f not in ok or "bf16" not in ok:
            return "–"
        a, b = ok[f][key]["tokens_per_s"], ok["bf16"][key]["tokens_per_s"]
        return f"{a / b:.2f}x"

    dk = [f"decode_{r}" for r in work.rows]
    kind = "Mixtral" if shape.moe else "Mistral"
    lines = [f"Model: {kind} shape {shape.name}, {shape.params / 1e9:.2f}B parameters, random weights loaded in "
             "bf16; int8 = q8_0, int4 = q4_0 (output head q8_0 in both; embedding and norms bf16).", "",
             f"Speed (median of the timed runs; decode: {work.decode_prompt}-token prompt per row, "
             f"{work.decode_tokens} new tokens, the engine's decode-step time):", "",
             "| format | " + " | ".join(f"decode {r} row{'s' * (r > 1)} (tok/s) | vs bf16" for r in work.rows)
             + f" | pre-fill {work.prefill_len} (tok/s) | vs bf16 |",
             "|---" * (2 * len(work.rows) + 3) + "|"]
    for f in (f for f in FORMATS if f in res):         # the formats this run measured
        if f not in ok:
            lines.append(f"| {f} | failed |")
            continue
        r = ok[f]
        cells = [f"{num(r[k]['tokens_per_s'], 2)} | {ratio(f, k)}" for k in dk]
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {num(r['prefill']['tokens_per_s'])} | "
                     f"{ratio(f, 'prefill')} |")
    lines += ["", "Bound: bandwidth (best whole pass over the 16 MiB chunks, before and after the format's timing, "
              "same process, the better of ordinary and huge-page memory) / bytes a decode step reads (every tensor "
              "but the embedding table; of a MoE layer's "
              "experts, the most the step's rows can choose: one value per row count where they differ):", "",
              "| format | bytes read per step (GB) | bandwidth (GB/s) | best chunk (GB/s) | bound (steps/s) | "
              + " | ".join(f"{r} row{'s' * (r > 1)}: steps/s, of bound" for r in work.rows)
              + " | of run-best bound (1 row) |",
              "|---" * (6 + len(work.rows)) + "|"]
    for f in FORMATS:
        if f not in ok:
            continue
        r = ok[f]
        bw, read = r["bandwidth_bytes_per_s"], r["decode_read_bytes"]
        nbytes = [read[str(n)] for n in work.rows]
        chunk = max(r["bandwidth_before"]["chunk_bytes_per_s"], r["bandwidth_after"]["chunk_bytes_per_s"])
        cells = [f"{r[k]['steps_per_s']:.2f}, {r[k]['steps_per_s'] / (bw / b):.0%}"
                 for k, b in zip(dk, nbytes, strict=True)]
        before = r['bandwidth_before']['pass_bytes_per_s']
        lines.append(f"| {f} | {' / '.join(f'{b / gb:.3f}' for b in dict.fromkeys(nbytes))} | {bw / gb:.1f} "
                     f"(before {before / gb:.1f}, after {r['bandwidth_after']['pass_bytes_per_s'] / gb:.1f}) | "
                     f"{chunk / gb:.1f} | {' / '.join(f'{bw / b:.2f}' for b in dict.fromkeys(nbytes))} | "
                     + " | ".join(cells) + f" | {r[dk[0]]['steps_per_s'] / (run_best_bw / nbytes[0]):.0%} |")
    lines += ["", "Peak resident memory above the size before loading (the quantized formats quantize each weight as "
              "it is read):", "",
              "| format | model bytes (GB) | peak, load (GB) | peak, + first token (GB) | peak, whole run "
              "(GB) | resident after first token (GB) | run peak / model bytes | run peak / bf16 model | load (s) |",
              "|---" * 9 + "|"]
    bf16_bytes = ok.get("bf16", {}).get("model_bytes")
    for f in FORMATS:
        if f not in ok:
            continue
        r = ok[f]
        lines.append(f"| {f} | {r['model_bytes'] / gb:.3f} | {r['load_peak_bytes'] / gb:.2f} | "
                     f"{r['first_token_peak_bytes'] / gb:.2f} | {r['run_peak_bytes'] / gb:.2f} | "
                     f"{r['rss_after_first_token_bytes'] / gb:.2f} | {r['run_peak_bytes'] / r['model_bytes']:.2f}x | "
                     + (f"{r['run_peak_bytes'] / bf16_bytes:.2f}x" if bf16_bytes else "–")
                     + f" | {r['load_seconds']:.1f} |")
    lines += ["", f"Perplexity on the bundled models' validation text (first {work.ppl_tokens:,} tokens, context "
              f"{work.ppl_context}, stride {work.ppl_stride}; bf16 activations):", "",
              "| model | tokens scored | bf16 | int8 | int8 vs bf16 | int4 | int4 vs bf16 |", "|---" * 7 + "|"]
    for name in PPL_MODELS:
        p = {f: ppl[f][name]["perplexity"] for f in FORMATS if "error" not in ppl.get(f, {"error": 1})}
        n = next((ppl[f][name]["tokens"] for f in p), None)
        base = p.get("bf16")

        def rel(f, p=p, base=base):
            return f"{p[f] / base - 1:+.2%}" if f in p and base else "–"
        lines.append(f"| {name} | {n if n is not None else '–'} | {num(p.get('bf16'), 3)} | {num(p.get('int8'), 3)} | "
                     f"{rel('int8')} | {num(p.get('int4'), 3)} | {rel('int4')} |")
    return lines


# -- command line ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape and workload: seconds, for smoke tests")
    ap.add_argument("--moe", action="store_true",
                    help="bench_inference's Mixtral shape (8 experts of 3584, top 2) instead of the dense 1B")
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache",
                    help="where the random checkpoint is written once and reused (default benchmarks/.cache)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from: " + ", ".join(FORMATS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every measuring process")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    ap.add_argument("--backend", choices=("auto", "cpu", "torch"), default="cpu",
                    help="the backend (backends.attach) for every format (default cpu: 'auto' keys on the "
                         "parameters' bytes and so picks torch for a quantized model whose blocks are buffers; the "
                         "run reports what auto would pick)")
    ap.add_argument("--no-perplexity", action="store_true", help="skip the perplexity runs")
    ap.add_argument("--json", action="store_true", help="print one JSON document with every figure to stdout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in a.formats if f not in FORMATS]
    if bad or not a.formats:
        ap.error(f"--formats: {bad or 'nothing'} not in {', '.join(FORMATS)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if spec["what"] == "build":
            out = build_checkpoints(Path(spec["workdir"]), work_for(spec)[0], [DTYPE]) or {}
        elif spec["what"] == "format":
            out = run_format(spec)
        else:
            out = run_perplexity(spec)
        Path(a.result).write_text(json.dumps(out))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    shape, work = work_for(dict(quick=a.quick, moe=a.moe))
    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        log(f"warning: load average {load_start[0]:.2f} before starting: other work will slow these figures down")
    jiffies0, child0, wall0 = busy_jiffies(), own_cpu_seconds(), time.perf_counter()
    base = dict(quick=a.quick, moe=a.moe, threads=a.threads, repeats=a.repeats, backend=a.backend,
                workdir=str(a.workdir.resolve()))
    log(f"checkpoint under {a.workdir} ({shape.name}, {DTYPE})")
    if "error" in spawn(dict(base, what="build"), log):
        return 1
    path = str(checkpoint_dir(a.workdir.resolve(), shape, DTYPE))
    res: dict[str, dict] = {}
    ppl: dict[str, dict] = {}
    loads = [load_start[0]]
    for f in a.formats:
        log(f"measuring {f} ...")
        t0 = time.perf_counter()
        res[f] = spawn(dict(base, what="format", format=f, path=path), log)
        loads.append(os.getloadavg()[0])
        log(f"  {f}: {time.perf_counter() - t0:.0f} s")
        (a.workdir / "last-quant-run.json").write_text(json.dumps(res, indent=1))    # survives an interrupted run
    if not a.no_perplexity:
        for f in a.formats:
            log(f"perplexity {f} ...")
            ppl[f] = spawn(dict(base, what="perplexity", format=f), log)
            loads.append(os.getloadavg()[0])
    wall = time.perf_counter() - wall0
    ticks, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    others = ((busy_jiffies()[0] - jiffies0[0]) / ticks - (own_cpu_seconds() - child0)) / (wall * ncpu)
    good = [r for r in res.values() if "error" not in r]
    run_best_bw = max((r["bandwidth_bytes_per_s"] for r in good), default=float("nan"))
    lines = report(res, ppl, shape, work, run_best_bw)
    notes = [f"backend {a.backend} for every format; 'auto' would pick: "
             + ", ".join(f"{f} {r['auto_backend']}" for f, r in res.items() if "error" not in r),
             f"best bandwidth of the whole run {run_best_bw / 1e9:.1f} GB/s (whole passes)",
             f"run: {wall / 60:.1f} min, {a.threads} threads, median of {a.repeats} after a warm-up; 1-minute load "
             f"average {min(loads):.2f}-{max(loads):.2f} (start {load_start[0]:.2f}, sampled after each subprocess); "
             f"other processes used {max(others, 0):.0%} of the {ncpu} CPUs meanwhile"
             + (" (figures contaminated)" if others > 0.1 else "")]
    table = "\n".join(lines + [""] + [f"- {n}" for n in notes])
    log(table)
    if a.json:
        print(json.dumps({"shape": asdict(shape), "workload": asdict(work), "results": res, "perplexity": ppl,
                          "run_best_bandwidth_bytes_per_s": run_best_bw, "notes": notes,
                          "load_averages": loads, "other_cpu_share": others}, indent=1))
    return 0 if all("error" not in r for r in list(res.values()) + list(ppl.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
