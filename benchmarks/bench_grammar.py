"""Constrained decoding: what llguidance's token masks cost per token, and what they cost a decode step.

Part 1, mask cost per token (``GrammarProcessor.fill_mask``, what the sampling seam calls, and ``accept``) on
three real vocabularies: the bundled models' sentencepiece (4096 tokens), Mistral's v3 sentencepiece (32768) and
tekken (131072), both shipped inside mistral-common. Two walks of 400 tokens each:

    string   inside a JSON string ({"text": string}), the worst case: nearly every token is allowed, so
             the mask is as full as it gets and nothing can be skipped
    nested   a random walk through a nested schema (enums, bounded integers and strings, arrays, anyOf with
             null): each step takes a token drawn uniformly among those the mask allows (seeded)

reported as median, p99 and mean microseconds per token, with the time to build llguidance's view of the
vocabulary (once per tokenizer) and to compile the grammar (once per schema). With xgrammar installed
(``--xgrammar``), the same string walk through it, for comparison.

Part 2, decode throughput at 8 rows on the 1B Mistral shape with random weights (bench_inference.py's
checkpoint: dim 2048, 16 layers, vocab 32000, bf16) and Mistral's v1 tokenizer (32000 pieces): 8 prompts of
16 tokens, 64 new tokens each, sampled (temperature 1, seeded), no EOS stop, through the Engine (``auto``
backend), unconstrained and constrained to {"text": string with minLength 10000} (the worst case above, and a
string that cannot end within 64 tokens, so both runs make the same tokens). Runs alternate ABBA after a
warm-up; tokens/s is the engine's decode time (engine.stats); the ratio constrained / unconstrained is the figure.

    python benchmarks/bench_grammar.py                    # both parts (the 1B checkpoint is written once, ~2 GB)
    python benchmarks/bench_grammar.py --quick            # a small shape and the bundled vocabulary: seconds
    python benchmarks/bench_grammar.py --masks-only --xgrammar
    python benchmarks/bench_grammar.py --json > grammar.json

Run it on a quiet machine: the report gives the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mistral_common  # noqa: E402

from bench_inference import FULL, Shape, build_checkpoints, checkpoint_dir, random_prompts  # noqa: E402
from sirocco.generate.grammar import GrammarProcessor, compiled, grammar_tokenizer, json_schema_grammar  # noqa: E402
from sirocco.generate.sampling import mask_words, unpack_mask  # noqa: E402
from sirocco.pretrained import BUNDLED  # noqa: E402
from sirocco.tokenizer import load_tokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
VOCABS = {"bundled (4096)": BUNDLED / "sirocco-tiny" / "tokenizer.model",
          "v3 (32768)": DATA / "mistral_instruct_tokenizer_240323.model.v3",
          "tekken (131072)": DATA / "tekken_240911.json"}
STRING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
NESTED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "kind": {"enum": ["cat", "dog", "fox"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
    "owner": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
        "first": {"type": "string"}, "score": {"type": "number"}}, "required": ["first", "score"]}]}},
    "required": ["name", "kind", "age", "tags", "owner"]}
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 10000}}, "required": ["text"]}
TEXT = ("The rolling buffer keeps the last W keys and values of every layer, so memory stays bounded while the "
        "sequence grows past the window. ") * 8
QUICK_SHAPE = Shape(256, 4, 4, 2, 768, 4096, 64)


def stats(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"median_us": statistics.median(s) * 1e6, "p99_us": s[int(0.99 * (len(s) - 1))] * 1e6,
            "mean_us": statistics.mean(s) * 1e6}


def walk(tok, schema: dict, steps: int, seed: int, text: bytes | None = None) -> dict:
    """Mask then accept, ``steps`` times: the tokens of ``text`` (inside the string), or uniform draws among the
    allowed tokens (restarting when the document is complete)."""
    vocab = tok.vocab_size
    g = json_schema_grammar(schema, strict=True)
    t0 = time.perf_counter()
    compiled(g, tok, vocab)
    compile_s = time.perf_counter() - t0
    rng = random.Random(seed)
    words = torch.empty(1, mask_words(vocab), dtype=torch.int32)
    p = GrammarProcessor(compiled(g, tok, vocab).deep_copy())
    forced = []
    if text is not None:
        p.accept(tok.token_vocab().encode(b'{"text": "'))
        forced = tok.token_vocab().encode(text)
    mask_s, accept_s, allowed = [], [], []
    for i in range(steps):
        t0 = time.perf_counter()
        p.fill_mask(words, ())
        mask_s.append(time.perf_counter() - t0)
        ids = unpack_mask(words, vocab)[0].nonzero()[:, 0].tolist()
        allowed.append(len(ids))
        t = forced[i % len(forced)] if forced else rng.choice([t for t in ids if t != tok.eos_id] or ids)
        t0 = time.perf_counter()
        p.accept([t])
        accept_s.append(time.perf_counter() - t0)
        if p.finished() and not forced:
            p = GrammarProcessor(compiled(g, tok, vocab).deep_copy())
    return {"mask": stats(mask_s), "accept": stats(accept_s), "allowed_median": statistics.median(allowed),
            "compile_ms": compile_s * 1e3}


def xgrammar_walk(tok, steps: int) -> dict:
    """The string walk through xgrammar, its vocabulary built from the same token bytes."""
    import xgrammar as xgr
    vocab = tok.token_vocab()
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo([b"" if i in set(vocab.special) else b for i, b in enumerate(vocab.tokens)],
                             xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(STRING), any_whitespace=False, separators=(", ", ": "))
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(cg)
    assert m.accept_string('{"text": "')
    forced = vocab.encode(TEXT.encode())
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    mask_s, accept_s = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bitmask, 0)
        mask_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert m.accept_token(forced[i % len(forced)])
        accept_s.append(time.perf_counter() - t0)
    return {"mask": stats(mask_s), "accept": stats(accept_s), "build_ms": build_s * 1e3, "compile_ms": compile_s * 1e3}


def mask_costs(quick: bool, steps: int, with_xgrammar: bool, log) -> dict:
    out = {}
    for name, path in VOCABS.items():
        if quick and not name.startswith("bundled"):
            continue
        tok = load_tokenizer(path)
        t0 = time.perf_counter()
        grammar_tokenizer(tok, tok.vocab_size)
        build_ms = (time.perf_counter() - t0) * 1e3
        row = {"vocab_build_ms": build_ms,
               "string": walk(tok, STRING, steps, 0, TEXT.encode()),
               "nested": walk(tok, NESTED, steps, 0)}
        if with_xgrammar:
            row["xgrammar_string"] = xgrammar_walk(tok, steps)
        out[name] = row
        st, ne = row["string"], row["nested"]
        line = (f"  {name:16s} vocabulary {build_ms:7.1f} ms; string: mask median {st['mask']['median_us']:6.1f} us, "
                f"p99 {st['mask']['p99_us']:6.1f} us ({st['allowed_median']:.0f} allowed); nested: median "
                f"{ne['mask']['median_us']:6.1f} us, p99 {ne['mask']['p99_us']:7.1f} us; accept "
                f"{st['accept']['median_us']:.1f} us")
        if with_xgrammar:
            x = row["xgrammar_string"]
            line += f"; xgrammar string: mask median {x['mask']['median_us']:.1f} us, p99 {x['mask']['p99_us']:.1f} us"
        log(line)
    return out


def decode_throughput(quick: bool, workdir: Path, repeats: int, log) -> dict:
    from sirocco.checkpoint import load_model
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams

    shape = QUICK_SHAPE if quick else FULL[0]
    build_checkpoints(workdir, shape, ["bfloat16"])
    model = load_model(checkpoint_dir(workdir, shape, "bfloat16"), dtype=torch.bfloat16, backend="auto")
    tok = load_tokenizer(VOCABS["bundled (4096)"] if quick else DATA / "tokenizer.model.v1")
    assert tok.vocab_size == shape.vocab_size
    rows, new = 8, 16 if quick else 64
    prompts = random_prompts([16] * rows, shape.vocab_size, seed=0)
    engine = Engine(model, tok, max_rows=rows, max_seq_len=256)
    grammar = json_schema_grammar(LONG_STRING)

    def run(constrained: bool) -> float:
        params = [SamplingParams(max_tokens=new, temperature=1.0, seed=i, stop_on_eos=False,
                                 constraint=grammar if constrained else None) for i in range(rows)]
        before = engine.stats.decode_tokens, engine.stats.decode_seconds
        done = engine.generate(prompts, params)
        assert all(len(c.tokens) == new and c.finish_reason == "length" for c in done)
        return (engine.stats.decode_tokens - before[0]) / (engine.stats.decode_seconds - before[1])

    run(False), run(True)                                       # warm-up: kernels built, grammar compiled
    free, constrained = [], []
    for i in range(repeats):
        for c in ((False, True) if i % 2 == 0 else (True, False)):     # ABBA
            (constrained if c else free).append(run(c))
    result = {"shape": shape.name, "backend": engine.backend, "rows": rows, "new_tokens": new,
              "unconstrained_tps": statistics.median(free), "constrained_tps": statistics.median(constrained),
              "runs": {"unconstrained": free, "constrained": constrained}}
    result["ratio"] = result["constrained_tps"] / result["unconstrained_tps"]
    log(f"  {shape.name}, {rows} rows, backend {engine.backend}: unconstrained {result['unconstrained_tps']:.1f} "
        f"tok/s, constrained {result['constrained_tps']:.1f} tok/s: {result['ratio']:.3f}x (target >= 0.9x)")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the bundled vocabulary and a small shape: seconds")
    ap.add_argument("--masks-only", action="store_true", help="part 1 only")
    ap.add_argument("--xgrammar", action="store_true", help="also the string walk through xgrammar (if installed)")
    ap.add_argument("--steps", type=int, default=400, help="tokens per mask walk (default 400)")
    ap.add_argument("--repeats", type=int, default=3, help="ABBA rounds of the decode runs (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache", help="where the random checkpoint is written")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on standard output")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result: dict = {"load_before": os.getloadavg()}
    log("mask cost per token (llguidance, through GrammarProcessor):")
    result["masks"] = mask_costs(a.quick, a.steps, a.xgrammar, log)
    if not a.masks_only:
        log("decode at 8 rows, constrained vs unconstrained:")
        result["decode"] = decode_throughput(a.quick, a.workdir, a.repeats, log)
    result["load_after"] = os.getloadavg()
    log(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
