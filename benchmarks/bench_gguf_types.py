"""What each quantization mix costs in perplexity, through sirocco and through llama.cpp, on the same GGUF files.

For one model (``--model``):

    trained   a dense model of rows a multiple of 256 (dim 256, 4 layers, 4 query heads over 1 kv head, hidden 768,
              no sliding window) trained here on the default corpus (the Python documentation) with the bundled
              sirocco-tiny tokenizer, --train-steps steps of 8 rows of 256 tokens (bf16 autocast); cached in the
              work folder
    random    random weights of the Mistral shape dim 512, 4 layers, 8/2 heads, hidden 1536 (same tokenizer)
    PATH      a checkpoint folder with a sentencepiece tokenizer.model (or a bundled model's name)

the checkpoint is written in fp16, then sirocco writes an F16 GGUF file of it (``save_gguf``) and one file per mix
(what ``sirocco quantize --type MIX`` writes: read_model quantizing while reading, the conversion pass, save_gguf).
Each file's perplexity is measured on the same text (the default corpus's validation documents, joined by blank
lines, --tokens tokens of it) in llama-perplexity's scheme, which sirocco's side follows here exactly: the tokens
(BOS first) cut into chunks of --context tokens, each chunk's first token replaced by BOS, the second half of each
chunk scored (its last context/2 - 1 tokens). With ``--llama-cpp DIR`` (a build's bin folder):

    llama-perplexity -m FILE -f TEXT -c CONTEXT -b CONTEXT -t THREADS     on every file sirocco wrote
    llama-quantize F16-FILE OUT MIX                                        llama.cpp's own file of each of its
                                                                           mixes, and its perplexity too

and the report gives, per mix: the cost over f16 through sirocco and through llama.cpp, their ratio of ratios
(``(ppl_sirocco(mix) / ppl_sirocco(f16)) / (ppl_llama(mix) / ppl_llama(f16))``, target within 1%), and llama.cpp's
perplexity of sirocco's file against that of llama-quantize's file of the same mix from the same weights (target
within 0.5%), with the share of their tensors that are byte for byte the same. The tokenization of the two is
checked on the whole text (llama-perplexity's --save-all-logits file records its tokens).

    python benchmarks/bench_gguf_types.py --llama-cpp /path/to/llama.cpp/build/bin            # trained model
    python benchmarks/bench_gguf_types.py --llama-cpp /path/to/llama.cpp/build/bin --model random
    python benchmarks/bench_gguf_types.py --quick                  # a small random model, sirocco only: seconds

The machine should be otherwise idle: the load average is reported at the start and the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
MIXES = ("q8_0", "q6_K", "q5_K_M", "q4_K_M", "iq4_xs", "q4_0", "q3_K_M", "q2_K")
LLAMA_MIXES = {"q6_K": "Q6_K", "q5_K_M": "Q5_K_M", "q4_K_M": "Q4_K_M", "iq4_xs": "IQ4_XS", "q3_K_M": "Q3_K_M",
               "q2_K": "Q2_K"}
TRAINED = dict(dim=256, n_layers=4, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=1)
RANDOM = dict(dim=512, n_layers=4, head_dim=64, hidden_dim=1536, n_heads=8, n_kv_heads=2)
QUICK = dict(dim=256, n_layers=1, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the model ------------------------------------------------------------------------------------------------------
def tokenizer_file() -> Path:
    from sirocco.pretrained import BUNDLED
    return BUNDLED / "sirocco-tiny" / "tokenizer.model"


def trained_folder(workdir: Path, steps: int, seq_len: int = 256) -> Path:
    """The dense model of TRAINED trained for ``steps`` steps, exported in fp16 with its tokenizer (cached)."""
    import torch

    from sirocco.train.recipe import Recipe, TrainRecipe
    from sirocco.train.run import train
    key = hashlib.sha256(json.dumps([TRAINED, steps, seq_len]).encode()).hexdigest()[:12]
    folder = workdir / f"trained-{key}"
    if (folder / "params.json").exists():
        return folder
    r = Recipe()
    r.tokenizer.path = str(tokenizer_file())
    r.data.seq_len = seq_len
    for k, v in TRAINED.items():
        setattr(r.model, k, v)
    r.model.max_seq_len = 4 * seq_len
    r.train = TrainRecipe(steps=steps, batch_rows=8, lr=3e-3, min_lr=3e-4, warmup=max(1, steps // 10),
                          eval_every=max(1, steps // 4), eval_rows=32, save_every=0, autocast="bf16")
    log(f"training {TRAINED} for {steps} steps into {folder} ...")
    t0 = time.perf_counter()
    summary = train(r, workdir / f"run-{key}", export=folder, export_dtype=torch.float16, progress=False)
    log(f"  trained in {time.perf_counter() - t0:.0f} s: validation loss {summary.get('val_loss')}")
    return folder


def random_folder(workdir: Path, shape: dict, name: str) -> Path:
    import torch

    from sirocco.checkpoint.save import save_consolidated
    from sirocco.config import ModelArgs
    from sirocco.model import build_model
    folder = workdir / name
    if not (folder / "params.json").exists():
        args = ModelArgs(**shape, norm_eps=1e-5, vocab_size=4096, max_seq_len=1024)
        save_consolidated(build_model(args, seed=0), args, folder, dtype=torch.float16)
        (folder / "tokenizer.model").write_bytes(tokenizer_file().read_bytes())
    return folder


# -- the text -------------------------------------------------------------------------------------------------------
def validation_text(workdir: Path, chars: int) -> Path:
    """The default corpus's validation documents joined by blank lines, the first ``chars`` characters."""
    path = workdir / f"validation-{chars}.txt"
    if not path.exists():
        from sirocco.train.corpus import load_corpus
        from sirocco.train.recipe import DataRecipe
        d = DataRecipe()
        text = "\n\n".join(doc.text for doc in load_corpus(d.corpus, d.val_fraction, d.min_chars).val)
        path.write_text(text[:chars], encoding="utf-8")
    return path


# -- the files ------------------------------------------------------------------------------------------------------
def write_files(folder: Path, workdir: Path, mixes: list[str]) -> dict[str, Path]:
    """The F16 file and one file per mix, as sirocco writes them (cached by the checkpoint's hash)."""
    import torch

    from sirocco import backends
    from sirocco.checkpoint import load_model, read_model
    from sirocco.checkpoint.gguf_write import save_gguf
    digest = hashlib.sha256((folder / "consolidated.safetensors").read_bytes()).hexdigest()[:12]
    out: dict[str, Path] = {}
    path = workdir / f"{folder.name}-{digest}-f16.gguf"
    if not path.exists():
        save_gguf(load_model(folder), path, folder / "tokenizer.model", torch.float16, name=folder.name)
    out["f16"] = path
    for mix in mixes:
        path = workdir / f"{folder.name}-{digest}-{mix}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            parts = read_model(folder, quantize=mix)
            conversion = backends.attach(parts.model, "torch", quantize=mix, blocks=parts.blocks)
            save_gguf(parts.model, path, folder / "tokenizer.model", torch.float16, name=folder.name, mix=mix,
                      embedding=conversion.embedding)
            log(f"  wrote {path.name} in {time.perf_counter() - t0:.1f} s")
        out[mix] = path
    return out


def weights_of(path: Path) -> dict:
    """Bits per weight of the file's matrices (every 2-D or 3-D tensor), and its size."""
    import gguf
    r = gguf.GGUFReader(path)
    values = sum(int(t.n_elements) for t in r.tensors if len(t.shape) >= 2)
    nbytes = sum(int(t.n_bytes) for t in r.tensors if len(t.shape) >= 2)
    return {"bits_per_weight": 8 * nbytes / values, "file_bytes": path.stat().st_size}


def same_tensors(a: Path, b: Path) -> dict:
    """How many tensors of two files hold the same type and bytes, and the share of differing bytes."""
    import gguf
    import numpy as np
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = differ_types = 0
    differing, total = 0, 0
    for name, t in ta.items():
        u = tb.get(name)
        if u is None or u.tensor_type != t.tensor_type:
            differ_types += 1
            continue
        x, y = np.asarray(t.data).view(np.uint8).ravel(), np.asarray(u.data).view(np.uint8).ravel()
        same += int(np.array_equal(x, y))
        differing += int((x != y).sum()) if x.shape == y.shape else x.size
        total += x.size
    return {"tensors": len(ta), "identical": same, "other_type": differ_types, "bytes_differing": differing / total}


# -- perplexity -----------------------------------------------------------------------------------------------------
def chunked_nll(model, ids: list[int], context: int, bos: int) -> tuple[float, int]:
    """llama-perplexity's scheme: chunks of ``context`` tokens, the first of each replaced by BOS, the tokens
    after position context/2 of each chunk scored; returns (total negative log-likelihood, tokens scored)."""
    import torch
    import torch.nn.functional as F
    first = context // 2
    nll, count = 0.0, 0
    at = torch.arange(first, context - 1)
    with torch.inference_mode():
        for i in range(len(ids) // context):
            x = torch.tensor(ids[i * context:(i + 1) * context])
            x[0] = bos
            logits = model(x, [context], logits_at=at).double()
            nll += F.cross_entropy(logits, x[first + 1:], reduction="sum").item()
            count += context - 1 - first
    return nll, count


def sirocco_perplexity(path: Path, text: Path, context: int, n_tokens: int) -> dict:
    import torch

    from sirocco.pretrained import load
    loaded = load(str(path), dtype=torch.float32, backend="auto")
    ids = loaded.tokenizer.encode(text.read_text(encoding="utf-8"), bos=True)[:n_tokens]
    t0 = time.perf_counter()
    nll, count = chunked_nll(loaded.model, ids, context, loaded.tokenizer.bos_id)
    return {"perplexity": math.exp(nll / count), "scored": count, "tokens": ids,
            "seconds": time.perf_counter() - t0}


def llama_perplexity(bin_dir: Path, path: Path, text: Path, context: int, threads: int, chunks: int,
                     logits_file: Optional[Path] = None) -> dict:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(context), "-b",
           str(context), "-t", str(threads), "--chunks", str(chunks)]
    if logits_file is not None:
        cmd += ["--save-all-logits", str(logits_file)]
    for attempt in range(3):
        # llama.cpp logs from a thread of its own, and a process that ends before it is flushed can lose the last
        # lines (the final estimate among them, with status 0): run it again then
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done.stdout + done.stderr)
        if found and not done.returncode:
            return {"perplexity": float(found[1]), "error": float(found[2]), "seconds": time.perf_counter() - t0}
        if done.returncode:
            break
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-12:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{tail}")


def llama_tokens(logits_file: Path) -> list[int]:
    """The tokens llama-perplexity wrote at the head of its --save-all-logits file ("_logits_", n_ctx, n_vocab, n_chunk,
    then n_chunk * n_ctx int32 tokens)."""
    import numpy as np
    raw = logits_file.read_bytes()
    n_ctx, _, n_chunk = np.frombuffer(raw, dtype="<i4", count=3, offset=8)
    return np.frombuffer(raw, dtype="<i4", count=int(n_ctx * n_chunk), offset=20).tolist()


def llama_quantize(bin_dir: Path, f16: Path, mix: str, threads: int) -> Path:
    out = f16.with_name(f16.name.replace("-f16.gguf", f"-{mix}-llama.gguf"))
    if not out.exists():
        cmd = [str(bin_dir / "llama-quantize"), str(f16), str(out), LLAMA_MIXES[mix], str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(done.stderr.splitlines()[-8:]))
    return out


# -- the run --------------------------------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.quick:
        folder = random_folder(a.workdir, QUICK, "random-quick")
    elif a.model == "trained":
        folder = trained_folder(a.workdir, a.train_steps)
    elif a.model == "random":
        folder = random_folder(a.workdir, RANDOM, "random")
    else:
        from sirocco.pretrained import model_folder
        folder = model_folder(a.model)
    text = validation_text(a.workdir, a.chars)
    log(f"model {folder}; text {text} ({text.stat().st_size} bytes); writing the files ...")
    files = write_files(folder, a.workdir, a.mixes)
    out: dict[str, Any] = {"model": str(folder), "context": a.context, "rows": {}}
    chunks = None
    for kind, path in files.items():
        s = sirocco_perplexity(path, text, a.context, a.tokens)
        ids = s.pop("tokens")
        chunks = len(ids) // a.context
        row: dict[str, Any] = {"file": path.name, **weights_of(path), "sirocco": s}
        if a.llama_cpp is not None:
            logits = a.workdir / "tokens.logits" if kind == "f16" else None
            row["llama"] = llama_perplexity(a.llama_cpp, path, text, a.context, a.threads, chunks, logits)
            if logits is not None:
                theirs = llama_tokens(logits)
                logits.unlink()
                row["tokens_agree"] = theirs == ids[:len(theirs)]
                if not row["tokens_agree"]:
                    at = next(i for i, (p, q) in enumerate(zip(theirs, ids)) if p != q)
                    log(f"warning: llama.cpp tokenizes the text differently from token {at} on")
            if kind in LLAMA_MIXES:
                own = llama_quantize(a.llama_cpp, files["f16"], kind, a.threads)
                row["llama_quantize"] = {"file": own.name, **weights_of(own),
                                         "llama": llama_perplexity(a.llama_cpp, own, text, a.context, a.threads,
                                                                   chunks),
                                         "same": same_tensors(path, own)}
        out["rows"][kind] = row
        log(f"  {kind}: sirocco {s['perplexity']:.4f}"
            + (f", llama.cpp {row['llama']['perplexity']:.4f}" if "llama" in row else ""))
    out["chunks"] = chunks
    return out


def report(res: dict) -> list[str]:
    rows = res["rows"]
    base = rows["f16"]
    has_llama = "llama" in base
    lines = [f"model {res['model']}, context {res['context']}, {res['chunks']} chunks "
             f"({base['sirocco']['scored']} tokens scored); f16 perplexity sirocco {base['sirocco']['perplexity']:.4f}"
             + (f", llama.cpp {base['llama']['perplexity']:.4f} (the two tokenize the text "
                f"{'alike' if base.get('tokens_agree') else 'DIFFERENTLY'})" if has_llama else ""), ""]
    head = "| mix | bits/weight | sirocco ppl | cost vs f16 |"
    rule = "|---|---|---|---|"
    if has_llama:
        head += (" llama.cpp ppl | cost vs f16 | ratio of ratios | llama-quantize's file: ppl | sirocco's file vs "
                 "it | tensors identical |")
        rule += "---|---|---|---|---|---|"
    lines += [head, rule]
    for kind, row in rows.items():
        if kind == "f16":
            continue
        s_cost = row["sirocco"]["perplexity"] / base["sirocco"]["perplexity"]
        line = (f"| {kind} | {row['bits_per_weight']:.2f} | {row['sirocco']['perplexity']:.4f} | "
                f"{100 * (s_cost - 1):+.2f}% |")
        if has_llama:
            l_cost = row["llama"]["perplexity"] / base["llama"]["perplexity"]
            row["ratio_of_ratios"] = s_cost / l_cost
            line += (f" {row['llama']['perplexity']:.4f} | {100 * (l_cost - 1):+.2f}% | "
                     f"{100 * (s_cost / l_cost - 1):+.3f}% |")
            own = row.get("llama_quantize")
            if own:
                vs = row["llama"]["perplexity"] / own["llama"]["perplexity"] - 1
                own["sirocco_file_vs_llama_file"] = vs
                same = own["same"]
                line += (f" {own['llama']['perplexity']:.4f} | {100 * vs:+.3f}% | "
                         f"{same['identical']}/{same['tensors']} |")
            else:
                line += " – | – | – |"
        lines.append(line)
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="llama.cpp's bin folder (llama-perplexity, llama-quantize); without it, sirocco only")
    ap.add_argument("--model", default="trained", help="trained, random, or a checkpoint folder or bundled name")
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma-separated, from: " + ", ".join(MIXES))
    ap.add_argument("--context", type=int, default=256, help="tokens per chunk (llama-perplexity's -c)")
    ap.add_argument("--tokens", type=int, default=40_000, help="tokens of the text scored at most")
    ap.add_argument("--chars", type=int, default=200_000, help="characters of validation text written")
    ap.add_argument("--train-steps", type=int, default=600, help="steps of the trained model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache" / "gguf-types")
    ap.add_argument("--quick", action="store_true", help="a one-layer random model, two mixes, a short text")
    ap.add_argument("--json", action="store_true", help="print one JSON document with every figure to stdout")
    a = ap.parse_args(argv)
    a.mixes = [m.strip() for m in a.mixes.split(",") if m.strip()]
    if a.quick:
        a.mixes, a.tokens, a.chars, a.context = ["q8_0", "q4_K_M"], 2048, 20_000, 128
    bad = [m for m in a.mixes if m not in MIXES]
    if bad:
        ap.error(f"--mixes: {bad} not in {', '.join(MIXES)}")
    if a.llama_cpp is not None and not (a.llama_cpp / "llama-perplexity").is_file():
        ap.error(f"--llama-cpp {a.llama_cpp}: no llama-perplexity there")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    load_start = os.getloadavg()[0]
    if load_start > 1.0:
        log(f"warning: load average {load_start:.2f} before starting: other work will slow this run down")
    t0 = time.perf_counter()
    res = run(a)
    lines = report(res)
    lines += ["", f"- run: {(time.perf_counter() - t0) / 60:.1f} min, {a.threads} threads; 1-minute load average "
                  f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"]
    log("\n".join(lines))
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
