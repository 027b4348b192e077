"""Each quantization mix's decode and pre-fill speed through sirocco, against bf16, the bandwidth bound and, given a
llama.cpp build, llama-bench on the same GGUF files.

The model is a random Mistral of bench_inference.py's 1B shape (dim 2048, 16 layers, 16 query heads over 4 kv
heads, hidden 7168, vocab 32000), written once in bf16 with sirocco's own tokenizer (the bundled sirocco-tiny's,
padded to the vocabulary) into the work folder; each mix's file is what ``sirocco quantize FOLDER FILE --type MIX``
writes (cached there too). Then, round after round, for bf16 (the checkpoint folder) and each file:

    sirocco      a fresh process loads the file (``pretrained.load``, bf16 activations, the conversion pass's
                 backend) and times, after one warm-up of each: pre-fill of a --prefill-token prompt to its first
                 token (tokens/s); decode of 1 row (a 16-token prompt, --decode-tokens new tokens, greedy, no EOS
                 stop) and of 8 rows (half as many new tokens each), the engine's decode-step time only
                 (generated tokens/s)
    llama.cpp    with --llama-cpp DIR (a build's bin folder): ``llama-bench -m FILE -t THREADS -p PREFILL -n
                 DECODE -r 1 -o json`` (pp and tg, one repetition after its warm-up) on the same file, right
                 after or right before sirocco: sirocco first in even rounds, llama.cpp first in odd ones

The figure per mix is the median over rounds, and the ratio sirocco / llama.cpp is taken within each round (both
saw nearly the same machine) and its median reported. The read bandwidth is measured before every round as
bench_quant_kernels.py measures it (the best 16 MiB chunk sum, ordinary or huge-page memory); the decode bound of
a mix is that bandwidth (the best of the run) over the bytes a 1-row decode step reads (every tensor of the loaded
model but the embedding table: bench_quant.decode_read_bytes), and its fraction is the median decode rate over
that bound.

    python benchmarks/bench_gguf_speed.py --llama-cpp /path/to/llama.cpp/build/bin          # about 25 min
    python benchmarks/bench_gguf_speed.py --mixes q4_K_M,q6_K --rounds 3 --json > speed.json
    python benchmarks/bench_gguf_speed.py --quick                   # a small model, sirocco only: seconds

The machine should be otherwise idle: the load average is reported per round and at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_inference import spawn  # noqa: E402  (the worker processes are bench_inference's)

MIXES = ("q8_0", "q6_K", "q5_K_M", "q4_K_M", "iq4_xs", "q3_K_M", "q2_K", "q4_0")
FULL = dict(dim=2048, n_layers=16, head_dim=128, n_heads=16, n_kv_heads=4, hidden_dim=7168, vocab_size=32000)
QUICK = dict(dim=256, n_layers=2, head_dim=64, n_heads=4, n_kv_heads=2, hidden_dim=768, vocab_size=4096)
DECODE_PROMPT = 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the files ------------------------------------------------------------------------------------------------------
def checkpoint(workdir: Path, shape: dict) -> Path:
    """The random bf16 checkpoint of ``shape`` with the bundled sirocco-tiny tokenizer (cached)."""
    import torch

    from sirocco.checkpoint.save import save_consolidated
    from sirocco.config import ModelArgs
    from sirocco.model import build_model
    from sirocco.pretrained import BUNDLED
    folder = workdir / ("random-" + "-".join(f"{k}{v}" for k, v in shape.items()))
    if not (folder / "params.json").exists():
        log(f"writing the random checkpoint {folder} ...")
        args = ModelArgs(**shape, norm_eps=1e-5, max_seq_len=4096)
        save_consolidated(build_model(args, dtype=torch.bfloat16, seed=0), args, folder, dtype=torch.bfloat16)
        (folder / "tokenizer.model").write_bytes((BUNDLED / "sirocco-tiny" / "tokenizer.model").read_bytes())
    return folder


def quantized_file(folder: Path, mix: str) -> Path:
    """``sirocco quantize FOLDER FILE --type MIX``'s file, next to the checkpoint (cached)."""
    path = folder.with_name(f"{folder.name}-{mix}.gguf")
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".part.gguf")
        cmd = [sys.executable, "-m", "sirocco.cli", "quantize", str(folder), str(tmp), "--type", mix, "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(done.stderr.splitlines()[-8:]))
        tmp.rename(path)
        log(f"  wrote {path.name} in {time.perf_counter() - t0:.0f} s")
    return path


# -- sirocco, in a worker process -----------------------------------------------------------------------------------
def run_sirocco(spec: dict) -> dict:
    """One file's (or the bf16 folder's) pre-fill and decode rates, after a warm-up of each."""
    import torch
    torch.set_num_threads(spec["threads"])
    from bench_quant import decode_read_bytes
    from sirocco.generate.engine import Engine, Stats
    from sirocco.generate.sampling import SamplingParams
    from sirocco.pretrained import load
    t0 = time.perf_counter()
    loaded = load(spec["path"], dtype=torch.bfloat16, backend="auto")
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0, "backend": loaded.backend}
    model, vocab = loaded.model, loaded.model.args.vocab_size
    out["model_bytes"], read = decode_read_bytes(model, (1, 8))
    out["decode_read_bytes"] = read[1]
    g = torch.Generator().manual_seed(1)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)

    n_pre, n_dec = spec["prefill"], spec["decode_tokens"]
    e_pre = Engine(model, None, max_rows=1, max_seq_len=n_pre + 2)
    pre = prompt(n_pre)
    for timed in (False, True):
        t = time.perf_counter()
        e_pre.generate([pre], greedy(1))
        if timed:
            out["prefill_tokens_per_s"] = n_pre / (time.perf_counter() - t)
    del e_pre
    for rows, tokens in ((1, n_dec), (8, max(1, n_dec // 2))):
        eng = Engine(model, None, max_rows=rows, max_seq_len=DECODE_PROMPT + tokens + 1)
        prompts = [prompt(DECODE_PROMPT) for _ in range(rows)]
        eng.generate(prompts, greedy(4))                                    # warm-up
        eng.stats = Stats()
        eng.generate(prompts, greedy(tokens))
        out[f"decode_{rows}_tokens_per_s"] = eng.stats.decode_tps
    return out


# -- llama.cpp --------------------------------------------------------------------------------------------------------
def run_llama(bin_dir: Path, path: Path, threads: int, prefill: int, decode: int) -> dict:
    """llama-bench's pp and tg tokens/s on ``path`` (one repetition after its warm-up)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(prefill), "-n", str(decode),
           "-r", "1", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-8:]))
    out = {}
    for test in json.loads(done.stdout):
        key = "prefill_tokens_per_s" if test["n_prompt"] else "decode_1_tokens_per_s"
        out[key] = float(test["avg_ts"])
    out["build"] = f"{test.get('build_commit', '?')} ({test.get('cpu_info', '?')})"
    return out


# -- the run --------------------------------------------------------------------------------------------------------
def bandwidth() -> float:
    """GB/s, as bench_quant_kernels.py measures it."""
    from bench_quant_kernels import read_bandwidth
    return read_bandwidth()


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(a.workdir, QUICK if a.quick else FULL)
    files = ({} if a.no_bf16 else {"bf16": folder}) | {mix: quantized_file(folder, mix) for mix in a.mixes}
    res: dict[str, Any] = {"model": str(folder), "threads": a.threads, "prefill": a.prefill,
                           "decode_tokens": a.decode_tokens, "rounds": [], "load_average": [os.getloadavg()]}
    for i in range(a.rounds):
        rnd: dict[str, Any] = {"round": i, "load_average": os.getloadavg(), "bandwidth_gb_per_s": bandwidth(),
                               "sirocco_first": i % 2 == 0, "kinds": {}}
        log(f"round {i + 1}/{a.rounds}: load average {rnd['load_average'][0]:.2f}, read bandwidth "
            f"{rnd['bandwidth_gb_per_s']:.1f} GB/s")
        for kind, path in files.items():
            spec = dict(what="sirocco", path=str(path), threads=a.threads, prefill=a.prefill,
                        decode_tokens=a.decode_tokens)
            row: dict[str, Any] = {}
            order = ["sirocco", "llama"] if i % 2 == 0 else ["llama", "sirocco"]
            for who in order:
                if who == "sirocco":
                    row["sirocco"] = spawn(spec, log, script=Path(__file__), label=f"sirocco {kind}")
                    if "error" in row["sirocco"]:
                        raise RuntimeError(f"sirocco on {path} failed")
                elif a.llama_cpp is not None and kind != "bf16":
                    row["llama"] = run_llama(a.llama_cpp, path, a.threads, a.prefill, a.decode_tokens)
            rnd["kinds"][kind] = row
            s = row["sirocco"]
            log(f"  {kind}: sirocco pre-fill {s['prefill_tokens_per_s']:.1f} tok/s, decode "
                f"{s['decode_1_tokens_per_s']:.1f} (1 row) {s['decode_8_tokens_per_s']:.1f} (8 rows)"
                + (f"; llama.cpp pp {row['llama']['prefill_tokens_per_s']:.1f} tg "
                   f"{row['llama']['decode_1_tokens_per_s']:.1f}" if "llama" in row else ""))
        res["rounds"].append(rnd)
    res["load_average"].append(os.getloadavg())
    res["bandwidth_gb_per_s"] = max(r["bandwidth_gb_per_s"] for r in res["rounds"])
    res["summary"] = summary(res, list(files))
    return res


def summary(res: dict, kinds: list[str]) -> dict[str, dict]:
    """Per kind: medians over rounds of each rate, of the within-round ratios to llama.cpp and of the fraction of
    the decode bound."""
    out = {}
    bw = res["bandwidth_gb_per_s"] * 1e9
    for kind in kinds:
        rows = [r["kinds"][kind] for r in res["rounds"]]
        s: dict[str, Any] = {"decode_read_bytes": rows[0]["sirocco"]["decode_read_bytes"]}
        s["decode_bound_tokens_per_s"] = bw / s["decode_read_bytes"]
        for key in ("prefill_tokens_per_s", "decode_1_tokens_per_s", "decode_8_tokens_per_s"):
            s[f"sirocco_{key}"] = statistics.median(r["sirocco"][key] for r in rows)
        s["sirocco_fraction_of_bound"] = s["sirocco_decode_1_tokens_per_s"] / s["decode_bound_tokens_per_s"]
        if all("llama" in r for r in rows):
            for key in ("prefill_tokens_per_s", "decode_1_tokens_per_s"):
                s[f"llama_{key}"] = statistics.median(r["llama"][key] for r in rows)
                ratios = [r["sirocco"][key] / r["llama"][key] for r in rows]
                s[f"ratio_{key}"] = statistics.median(ratios)
                s[f"ratio_{key}_range"] = (min(ratios), max(ratios))
            s["llama_fraction_of_bound"] = s["llama_decode_1_tokens_per_s"] / s["decode_bound_tokens_per_s"]
            s["llama_build"] = rows[0]["llama"]["build"]
        out[kind] = s
    base = out.get("bf16")
    for s in out.values():
        if base is not None:
            s["decode_1_vs_bf16"] = s["sirocco_decode_1_tokens_per_s"] / base["sirocco_decode_1_tokens_per_s"]
            s["prefill_vs_bf16"] = s["sirocco_prefill_tokens_per_s"] / base["sirocco_prefill_tokens_per_s"]
    return out


def report(res: dict) -> list[str]:
    summ = res["summary"]
    has_llama = any("llama_decode_1_tokens_per_s" in s for s in summ.values())
    loads = [r["load_average"][0] for r in res["rounds"]]
    lines = [f"model {res['model']}; {res['threads']} threads; {len(res['rounds'])} rounds; pre-fill "
             f"{res['prefill']} tokens, decode {res['decode_tokens']} tokens (1 row); read bandwidth "
             f"{res['bandwidth_gb_per_s']:.1f} GB/s (best of the rounds); 1-minute load average at the rounds' "
             f"starts {', '.join(f'{x:.2f}' for x in loads)}", ""]
    head = "| type | pre-fill tok/s | decode tok/s 1 row | 8 rows | vs bf16 (decode) | of bound |"
    rule = "|---|---|---|---|---|---|"
    if has_llama:
        head += (" llama.cpp pp tok/s | sirocco / llama.cpp pp | llama.cpp tg tok/s | sirocco / llama.cpp tg "
                 "(range) | llama.cpp of bound |")
        rule += "---|---|---|---|---|"
    lines += [head, rule]
    for kind, s in summ.items():
        vs_bf16 = f"{s['decode_1_vs_bf16']:.2f}x" if "decode_1_vs_bf16" in s else "–"    # --no-bf16: no baseline
        line = (f"| {kind} | {s['sirocco_prefill_tokens_per_s']:.1f} | {s['sirocco_decode_1_tokens_per_s']:.1f} | "
                f"{s['sirocco_decode_8_tokens_per_s']:.1f} | {vs_bf16} | "
                f"{s['sirocco_fraction_of_bound']:.0%} |")
        if has_llama:
            if "llama_decode_1_tokens_per_s" in s:
                lo, hi = s["ratio_decode_1_tokens_per_s_range"]
                line += (f" {s['llama_prefill_tokens_per_s']:.1f} | {s['ratio_prefill_tokens_per_s']:.2f}x | "
                         f"{s['llama_decode_1_tokens_per_s']:.1f} | {s['ratio_decode_1_tokens_per_s']:.2f}x "
                         f"({lo:.2f}-{hi:.2f}) | {s['llama_fraction_of_bound']:.0%} |")
            else:
                line += " – | – | – | – | – |"
        lines.append(line)
    build = next((s["llama_build"] for s in summ.values() if "llama_build" in s), None)
    if build:
        lines += ["", f"llama.cpp build {build}"]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="llama.cpp's bin folder (llama-bench); without it, sirocco only")
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma-separated, from: " + ", ".join(MIXES))
    ap.add_argument("--rounds", type=int, default=3, help="rounds, sirocco and llama.cpp alternated in each")
    ap.add_argument("--prefill", type=int, default=512, help="pre-fill prompt tokens (llama-bench's -p)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="1-row decode tokens (llama-bench's -n)")
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bf16 baseline (to add mixes to a run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache" / "gguf-speed")
    ap.add_argument("--quick", action="store_true", help="a small random model, two mixes, one round, short runs")
    ap.add_argument("--json", action="store_true", help="print one JSON document with every figure to stdout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.mixes = [m.strip() for m in a.mixes.split(",") if m.strip()]
    if a.quick:
        a.mixes, a.rounds, a.prefill, a.decode_tokens = ["q8_0", "q4_K_M"], 1, 32, 8
    bad = [m for m in a.mixes if m not in MIXES]
    if bad:
        ap.error(f"--mixes: {bad} not in {', '.join(MIXES)}")
    if a.rounds < 1:
        ap.error(f"--rounds: at least 1, got {a.rounds}")
    if a.llama_cpp is not None and not (a.llama_cpp / "llama-bench").is_file():
        ap.error(f"--llama-cpp {a.llama_cpp}: no llama-bench there")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(run_sirocco(json.loads(a.worker))))
        return 0
    t0 = time.perf_counter()
    res = run(a)
    lines = report(res)
    lines += ["", f"- run: {(time.perf_counter() - t0) / 60:.1f} min; 1-minute load average "
                  f"{res['load_average'][0][0]:.2f} at the start, {res['load_average'][-1][0]:.2f} at the end"]
    log("\n".join(lines))
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
