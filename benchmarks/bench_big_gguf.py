"""Big GGUF files on a small machine: peak memory and decode speed of sirocco beside llama.cpp on the same file.

Two cases, each a file of random weights of a real model's shape (``--case``, both by default):

    mixtral-q2_K       Mixtral-8x7B (dim 4096, 32 layers, 32/8 heads, hidden 14336, 8 experts top 2, vocab 32000)
                       written directly in Q2_K by make_gguf.py, tensor by tensor (no float model anywhere)
    mistral-7b-q4_K_M  Mistral-7B (the same without experts) as a user makes it: transformers builds the model
                       from a MistralConfig in bf16 (on the meta device, then filled parameter by parameter: no
                       fp32 copy) and save_pretrained writes safetensors with Mistral's v1 tokenizer.model beside
                       them; llama.cpp's convert_hf_to_gguf.py converts the folder to F16 and llama-quantize makes
                       Q4_K_M of it; the folder and the F16 file are deleted as soon as they are used

then, on the file:

    sirocco generate --model FILE --max-tokens N --temperature 0 --ignore-eos --threads T --json PROMPT
    llama-bench -m FILE -t T -n N -p 0 -r 1                                  (with --llama-cpp DIR)

each in its own process, whose peak resident memory is the kernel's (``wait4``'s ru_maxrss, what
``/usr/bin/time -v`` reports); sirocco's decode rate is its own summary line's, llama.cpp's llama-bench's. The
bound is the bytes a decode step reads (every tensor at its type's size, a MoE layer's experts at used/count of
their stack, the embedding's one row) over the machine's read bandwidth (bench_quant_kernels.read_bandwidth,
probed before each round; the bound is taken at the best probe). llama.cpp's resident memory counts the file's
pages it maps; sirocco reads the blocks into its own memory and maps nothing.

The 7B case needs a llama.cpp build (``--llama-cpp``: its bin folder; its source, for the converter, is found two
folders up or given by ``--llama-cpp-source``). Files go to ``--workdir`` (about 17 GB for Mixtral, 4.4 GB for the
7B file and 29 GB more while converting); they are kept for the next run unless ``--delete``. Heavy steps run
at ``nice 10``; the machine should be otherwise idle (the load average is reported).

    python benchmarks/bench_big_gguf.py --workdir /big --llama-cpp ~/llama.cpp/build/bin
    python benchmarks/bench_big_gguf.py --workdir /big --case mixtral-q2_K --json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = ("mistral-7b-q4_K_M", "mixtral-q2_K")
MISTRAL_7B: dict[str, Any] = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
PROMPT = "The capital of France is"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_run(cmd: list[str], nice: int = 0, env: dict | None = None) -> tuple[str, str, int, float]:
    """Run ``cmd`` to its end with its output in temporary files; (stdout, stderr, peak resident bytes, seconds):
    the peak is ``wait4``'s ru_maxrss of that one process (KiB on Linux)."""
    import tempfile
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env,
                             preexec_fn=(lambda: os.nice(nice)) if nice else None)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({p.returncode}):\n{err[-3000:]}")
    return out, err, usage.ru_maxrss * 1024, seconds


# -- the files ------------------------------------------------------------------------------------------------------
def mixtral_file(workdir: Path) -> Path:
    path = workdir / "mixtral-8x7b-q2_K.gguf"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        log(f"writing {path} (make_gguf.py, Mixtral-8x7B shape, Q2_K) ...")
        _, _err, rss, s = peak_rss_run([sys.executable, str(HERE / "make_gguf.py"), "--shape", "mixtral-8x7b",
                                       "--mix", "q2_K", "--out", str(tmp)], nice=10)
        tmp.rename(path)
        log(f"  {path.stat().st_size / 1e9:.2f} GB in {s:.0f} s, the writer's peak {rss / 1e9:.2f} GB")
    return path


def write_hf_7b(folder: Path) -> None:
    """Random Mistral-7B weights (normal, std 0.02; norms ones) in bf16, saved by transformers with Mistral's v1
    tokenizer.model. Run in its own process (``--step hf``), so that its 14.5 GB are returned at its end."""
    import mistral_common
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(**MISTRAL_7B)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
    del model
    cfg = json.loads((tmp / "config.json").read_text())
    # llama.cpp's converter reads these two at the top level (transformers 5 writes rope_theta inside
    # rope_parameters, and head_dim only where set)
    cfg.setdefault("rope_theta", MISTRAL_7B["rope_theta"])
    cfg.setdefault("head_dim", MISTRAL_7B["head_dim"])
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp / "tokenizer.model")
    tmp.rename(folder)


def mistral_7b_file(workdir: Path, bin_dir: Path, source: Path) -> Path:
    path = workdir / "mistral-7b-q4_K_M.gguf"
    if path.exists():
        return path
    folder, f16 = workdir / "mistral-7b-hf", workdir / "mistral-7b-f16.gguf"
    if not folder.exists() and not f16.exists():
        log(f"writing {folder} (transformers, bf16 safetensors) ...")
        _, _, rss, s = peak_rss_run([sys.executable, __file__, "--step", "hf", "--workdir", str(workdir)], nice=10)
        log(f"  {dir_bytes(folder) / 1e9:.2f} GB in {s:.0f} s, peak {rss / 1e9:.2f} GB")
    if not f16.exists():
        log(f"converting to {f16} (convert_hf_to_gguf.py --outtype f16) ...")
        tmp = f16.with_suffix(".partial")
        _, _, rss, s = peak_rss_run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                                     "f16", "--outfile", str(tmp)], nice=10)
        tmp.rename(f16)
        log(f"  {f16.stat().st_size / 1e9:.2f} GB in {s:.0f} s, peak {rss / 1e9:.2f} GB")
    if folder.exists():
        shutil.rmtree(folder)
    log(f"quantizing to {path} (llama-quantize Q4_K_M) ...")
    tmp = path.with_suffix(".partial")
    _, _, rss, s = peak_rss_run([str(bin_dir / "llama-quantize"), str(f16), str(tmp), "Q4_K_M", "2"], nice=10)
    tmp.rename(path)
    f16.unlink()
    log(f"  {path.stat().st_size / 1e9:.2f} GB in {s:.0f} s, peak {rss / 1e9:.2f} GB")
    return path


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.exists() else 0


# -- the measures ---------------------------------------------------------------------------------------------------
def decode_bytes(path: Path) -> dict:
    """Bytes one decode step reads from the file's tensors: each at its stored size, a stack of experts at
    used/count of it, the embedding one row."""
    import gguf
    r = gguf.GGUFReader(str(path))
    fields = {key: r.get_field(f"llama.{key}") for key in ("expert_count", "expert_used_count")}
    count = int(fields["expert_count"].contents()) if fields["expert_count"] is not None else 0
    used = int(fields["expert_used_count"].contents()) if fields["expert_used_count"] is not None else 0
    total = experts = 0.0
    for t in r.tensors:
        n = float(t.n_bytes)
        if t.name == "token_embd.weight":
            n /= int(t.shape[-1])                  # GGUF lists dims innermost first: shape[-1] is the vocabulary
        elif t.name.endswith("_exps.weight"):
            n *= used / count
            experts += n
        total += n
    return {"bytes_per_token": total, "expert_bytes_per_token": experts, "file_bytes": path.stat().st_size}


def bandwidth(threads: int) -> float:
    import torch
    sys.path.insert(0, str(HERE))
    from bench_quant_kernels import read_bandwidth
    torch.set_num_threads(threads)
    return read_bandwidth()


def run_sirocco(path: Path, tokens: int, threads: int) -> dict:
    cmd = [sys.executable, "-c", "import sys; from sirocco.cli import main; sys.exit(main())", "generate", "--model",
           str(path), "--max-tokens", str(tokens), "--temperature", "0", "--ignore-eos", "--threads", str(threads),
           "--json", "--no-progress", PROMPT]
    out, err, rss, seconds = peak_rss_run(cmd)
    m = re.search(r"decode ([\d.]+) tok/s", err)
    if m is None:
        raise SystemExit(f"no decode rate in sirocco's output:\n{err[-2000:]}")
    completion = json.loads(out.splitlines()[0])
    return {"decode_tps": float(m.group(1)), "peak_rss": rss, "seconds": round(seconds, 1),
            "tokens": len(completion["tokens"]), "finite": all(abs(x) < float("inf") for x in completion["logprobs"])}


def run_llama(path: Path, bin_dir: Path, tokens: int, threads: int) -> dict:
    out, _, rss, seconds = peak_rss_run([str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-n",
                                         str(tokens), "-p", "0", "-r", "1", "-o", "json"])
    [row] = json.loads(out)
    return {"decode_tps": float(row["avg_ts"]), "peak_rss": rss, "seconds": round(seconds, 1)}


def measure(case: str, path: Path, a: argparse.Namespace) -> dict:
    """Rounds of sirocco then llama.cpp on ``path``, the read bandwidth probed right before each round (the host's
    swings by several times within minutes when it is shared); the bound is taken at the best probe."""
    info = decode_bytes(path)
    row: dict = {"case": case, "file": str(path), **info, "bandwidth_gbps": []}
    log(f"{case}: {info['file_bytes'] / 1e9:.2f} GB, {info['bytes_per_token'] / 1e9:.2f} GB read per token")
    for r in range(a.rounds):
        gbps = bandwidth(a.threads)
        row["bandwidth_gbps"].append(round(gbps, 2))
        log(f"  round {r + 1}: read bandwidth {gbps:.1f} GB/s (bound {gbps * 1e9 / info['bytes_per_token']:.2f} "
            f"tok/s), load average {os.getloadavg()[0]:.2f}")
        s = run_sirocco(path, a.tokens, a.threads)
        row.setdefault("sirocco", []).append(s)
        log(f"  round {r + 1} sirocco: decode {s['decode_tps']:.2f} tok/s, peak RSS {s['peak_rss'] / 1e9:.2f} GB "
            f"({s['peak_rss'] / info['file_bytes']:.3f}x the file), {s['seconds']:.0f} s")
        if a.llama_cpp:
            lc = run_llama(path, a.llama_cpp, a.tokens, a.threads)
            row.setdefault("llama_cpp", []).append(lc)
            log(f"  round {r + 1} llama.cpp: decode {lc['decode_tps']:.2f} tok/s, peak RSS "
                f"{lc['peak_rss'] / 1e9:.2f} GB, {lc['seconds']:.0f} s")
    row["bound_tps"] = round(max(row["bandwidth_gbps"]) * 1e9 / info["bytes_per_token"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="where the files are written (tens of GB)")
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp build's bin folder (llama-bench, llama-quantize)")
    ap.add_argument("--llama-cpp-source", type=Path, help="llama.cpp's source (default: two folders above the bin)")
    ap.add_argument("--case", choices=CASES, action="append", help="repeatable (default: both)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens decoded per run (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--delete", action="store_true", help="delete each file after measuring it")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step", choices=["hf"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.step == "hf":
        write_hf_7b(a.workdir / "mistral-7b-hf")
        return 0
    cases = a.case or list(CASES)
    source = a.llama_cpp_source or (a.llama_cpp.resolve().parents[1] if a.llama_cpp else None)
    if "mistral-7b-q4_K_M" in cases and (a.llama_cpp is None or source is None
                                         or not (source / "convert_hf_to_gguf.py").exists()):
        ap.error("the mistral-7b-q4_K_M case needs --llama-cpp DIR (and its source: --llama-cpp-source)")
    log(f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for case in cases:
        if case == "mixtral-q2_K":
            path = mixtral_file(a.workdir)
        else:
            assert a.llama_cpp is not None and source is not None
            path = mistral_7b_file(a.workdir, a.llama_cpp, source)
        rows.append(measure(case, path, a))
        if a.delete:
            path.unlink()
    log(f"load average {os.getloadavg()[0]:.2f}")
    if a.json:
        print(json.dumps({"threads": a.threads, "tokens": a.tokens, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
