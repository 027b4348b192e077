"""sirocco against Hugging Face transformers on the same weights, in the same run, on CPU.

A Mistral-shaped checkpoint with random weights (dim 2048, 16 layers, 16 heads, 4 kv heads, hidden 7168,
vocab 32000, window 4096: about 1.0B parameters) is written once by transformers, in each dtype, into the
work folder. Every measurement then runs in a fresh subprocess per (library, dtype, measurement), so that peak
memory is that process's own and one library's allocations cannot help or hurt the other:

    load      peak resident memory while loading (VmHWM minus the resident size after imports), load time
    prefill   a 512-token prompt to its first token (generate one token): tokens/s
    decode    batch 1: (time for 128 tokens - time for 1 token) / 127, i.e. decode steps only: tokens/s;
              the read bandwidth is probed before and after each timed run, in the same process
    batch     8 prompts of 100..800 tokens, 128 tokens each, end to end: generated tokens/s
              (sirocco packs the prompts without padding; transformers pads them on the left)

Ceilings measured in the same run (one more subprocess): matmul FLOP/s (a large bf16 product, and fp32) and
memory read bandwidth (a sum over a 2 GiB fp32 tensor). From them:

    decode bound   = read bandwidth / bytes a decode step must read (every weight but the embedding table),
                     with the best bandwidth of the whole run, and with the best probe around the decode runs
    pre-fill bound = matmul rate / (2 x the parameters every token multiplies: the layers' weights)

Targets (PASS/MISS with the measured ratio): bf16 batch-1 decode >= 1.8x transformers and >= 60% of its
bound; bf16 pre-fill >= 1.0x transformers and >= 75% of its bound; 8 mixed-length prompts >= 2x transformers'
padded-batch throughput (each dtype); peak memory while loading <= 1.2x the weights' bytes (each library is
reported, sirocco is checked). Both libraries decode greedily for a fixed number of tokens (no end-of-sequence
stop); how many leading tokens agree is reported and never fails the run (random weights in bf16 diverge).

Timings exclude a warm-up run and are medians of --repeats runs. The machine should be otherwise idle: the run
reports the share of the CPUs other processes used while it ran.

    python benchmarks/bench_inference.py                    # everything, bf16 and fp32 (about 25 minutes)
    python benchmarks/bench_inference.py --quick            # a small shape, to check that it all works
    python benchmarks/bench_inference.py --dtypes bfloat16 --only decode,prefill --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LIBRARIES = ("sirocco", "transformers")
MEASUREMENTS = ("load", "prefill", "decode", "batch")
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class Shape:
    """The checkpoint's architecture, in Hugging Face's MistralConfig terms (MixtralConfig's with experts)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int
    num_local_experts: int = 0              # 0: a dense Mistral; else a Mixtral of this many experts per layer
    num_experts_per_tok: int = 0

    @property
    def moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def name(self) -> str:
        experts = f"-e{self.num_local_experts}k{self.num_experts_per_tok}" if self.moe else ""
        return (f"d{self.hidden_size}-l{self.num_hidden_layers}-h{self.num_attention_heads}"
                f"-kv{self.num_key_value_heads}-f{self.intermediate_size}-v{self.vocab_size}-w{self.sliding_window}"
                f"{experts}")

    def _layers(self, experts: int) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        attn = self.hidden_size * head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        ffn = 3 * self.hidden_size * self.intermediate_size * max(experts, 1)
        router = self.hidden_size * self.num_local_experts
        return self.num_hidden_layers * (attn + ffn + router + 2 * self.hidden_size)

    @property
    def layer_params(self) -> int:
        """Weights of the transformer blocks that every token multiplies (a MoE token: its k experts only), and
        the norms."""
        return self._layers(self.num_experts_per_tok)

    @property
    def params(self) -> int:
        """Every weight stored (a MoE: all its experts)."""
        return self._layers(self.num_local_experts) + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def decode_read_params(self) -> int:
        """What one decode step of one sequence reads: everything but the embedding table (one row of it is a
        lookup), and of a MoE layer's experts only the k the token chose."""
        return self.layer_params + self.vocab_size * self.hidden_size + self.hidden_size

    def decode_bound(self, read_bytes_per_s: float, dtype: str) -> float:
        """Decode tokens/s if a step did nothing but read its weights at ``read_bytes_per_s``."""
        return read_bytes_per_s / (self.decode_read_params * (2 if dtype == "bfloat16" else 4))


@dataclass(frozen=True)
class Workload:
    prefill_len: int            # the pre-fill prompt
    decode_prompt: int          # the batch-1 decode prompt
    decode_tokens: int          # tokens generated at batch 1
    batch_lengths: tuple        # prompt lengths of the mixed batch
    batch_tokens: int           # tokens generated per prompt of the batch


FULL = (Shape(2048, 16, 16, 4, 7168, 32000, 4096),
        Workload(512, 64, 128, tuple(range(100, 801, 100)), 128))
QUICK = (Shape(256, 4, 4, 2, 768, 1000, 64),
         Workload(64, 16, 16, (10, 20, 30, 40, 50, 60, 70, 80), 8))
# A Mixtral shape (8 experts of hidden 3584, top 2: 0.79B parameters, 0.2B of them per token) and its small one
MOE = (Shape(1024, 8, 16, 4, 3584, 32000, 4096, 8, 2), FULL[1])
MOE_QUICK = (Shape(256, 2, 4, 2, 512, 1000, 64, 4, 2), QUICK[1])


def shape_for(quick: bool, moe: bool) -> tuple[Shape, Workload]:
    return (MOE_QUICK if quick else MOE) if moe else (QUICK if quick else FULL)


# -- process facts ---------------------------------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks (first line of /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7]      # user nice system irq softirq steal (guest is in user)
    return busy, busy + f[3] + f[4]


def own_cpu_seconds() -> float:
    """CPU time of this process and of its finished subprocesses."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(fn: Callable[[], Any], repeats: int, warm_up: bool = True) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls (after one untimed call), and the last call's result."""
    out = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# -- prompts (the same token ids in every subprocess) ----------------------------------------------------------
def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# -- the checkpoint ----------------------------------------------------------------------------------------------
def checkpoint_dir(workdir: Path, shape: Shape, dtype: str) -> Path:
    return workdir / f"{'mixtral' if shape.moe else 'mistral'}-{shape.name}-{dtype}"


def build_checkpoints(workdir: Path, shape: Shape, dtypes: list[str], seed: int = 0) -> None:
    """Write a random Mistral checkpoint per dtype with transformers (safetensors), all holding the same
    values (rounded to bf16 once); a folder that already holds config.json is kept."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
    todo = [d for d in dtypes if not (checkpoint_dir(workdir, shape, d) / "config.json").exists()]
    if not todo:
        return
    fields = asdict(shape)
    if not shape.moe:
        del fields["num_local_experts"], fields["num_experts_per_tok"]
    config = (MixtralConfig if shape.moe else MistralConfig)(
        **fields, head_dim=shape.hidden_size // shape.num_attention_heads, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = (MixtralForCausalLM if shape.moe else MistralForCausalLM)(config).eval()
    model.to(torch.bfloat16).to(torch.float32)      # values every dtype holds exactly: the same weights in each
    for dtype in todo:
        out = checkpoint_dir(workdir, shape, dtype)
        tmp = out.with_name(out.name + ".partial")
        model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out)
        print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e9:.2f} GB)", file=sys.stderr)


def weight_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors checkpoint (file sizes minus their small JSON headers)."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


# -- the two libraries behind one interface ---------------------------------------------------------------------
class SiroccoRunner:
    """Loads with sirocco.checkpoint.load_model and generates with the Engine (greedy, no EOS stop)."""

    name = "sirocco"

    def __init__(self, backend: str):
        self.backend = backend

    def imports(self) -> None:
        import sirocco.checkpoint
        import sirocco.generate.engine  # noqa: F401

    def load(self, path: Path, dtype) -> None:
        from sirocco.checkpoint import load_model
        self.model = load_model(path, dtype=dtype, device="cpu")

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        from sirocco.generate.sampling import SamplingParams
        engine = self.engines[len(prompts)]
        params = SamplingParams(max_tokens=n, temperature=0.0, stop_on_eos=False)
        return [c.tokens for c in engine.generate(prompts, params)]

    def prepare(self, rows: list[int], max_seq_len: int) -> dict:
        """The model on its backend (its decode kernel compiled) and one engine per batch size, before any
        timing."""
        from sirocco import backends
        from sirocco.generate.engine import Engine
        t0 = time.perf_counter()
        backends.attach(self.model, self.backend)
        self.engines = {r: Engine(self.model, None, max_rows=r, max_seq_len=max_seq_len)
                        for r in sorted(set(rows))}
        return {"setup_seconds": time.perf_counter() - t0,
                "fast_decode": self.engines[min(rows)].backend == "cpu"}


class TransformersRunner:
    """Loads with from_pretrained and generates with generate (greedy, exactly n tokens, padding on the left)."""

    name = "transformers"

    def imports(self) -> None:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        from transformers import AutoModelForCausalLM  # noqa: F401

    def load(self, path: Path, dtype) -> None:
        from transformers import AutoModelForCausalLM  # MistralForCausalLM or MixtralForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def prepare(self, rows: list[int], max_seq_len: int) -> dict:
        return {"attn_implementation": self.model.config._attn_implementation}

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        import torch
        width = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            # min_new_tokens = max_new_tokens and no eos_token_id: exactly n tokens, and greedy picks are not
            # bent by an EOS suppression (sirocco runs without a tokenizer, so it has no EOS to stop at either).
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=pad, eos_token_id=None)
        return out[:, width:].tolist()


# -- one measurement, in a subprocess -----------------------------------------------------------------------------
def fastest(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls after one untimed call: a ceiling is the best the machine does."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_buffer(quick: bool):
    """The buffer every bandwidth figure sums: 2 GiB of fp32 (256 MiB if quick), far larger than the caches."""
    import torch
    return torch.ones((2**28 if quick else 2**31) // 4)


def read_bandwidth(buf, repeats: int = 5) -> float:
    """Bytes per second of the best of ``repeats`` sums over ``buf``."""
    return buf.numel() * 4 / fastest(buf.sum, repeats)


def bandwidth_probe(quick: bool) -> Callable[[], float]:
    """A function that measures the read bandwidth now, exactly as the ceilings do, for probes taken between
    timed runs. On this kind of shared machine the bandwidth swings between about 33 and 63 GB/s within
    seconds."""
    buf = read_buffer(quick)
    return lambda: read_bandwidth(buf)


def timed_with_probes(fn: Callable[[], Any], repeats: int, probe: Callable[[], float]) -> tuple[float, Any, list]:
    """Like ``timed``, with a bandwidth probe before the first and after every timed call (outside the timing)."""
    fn()
    times, samples = [], [probe()]
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        samples.append(probe())
    return statistics.median(times), out, samples


def measure_ceilings(quick: bool, repeats: int = 5) -> dict:
    """This machine right now: matmul FLOP/s in bf16 and fp32 (a large product in nn.Linear's layout) and memory
    read bandwidth (a sum over a buffer far larger than the caches)."""
    import torch
    import torch.nn.functional as F
    out = {}
    m, k, n = (256, 1024, 2048) if quick else (1024, 4096, 8192)
    with torch.inference_mode():
        for dtype in ("bfloat16", "float32"):
            x = torch.randn(m, k).to(getattr(torch, dtype))
            w = torch.randn(n, k).to(getattr(torch, dtype))           # (out, in), as nn.Linear stores it
            out[f"matmul_flops_{dtype}"] = 2 * m * k * n / fastest(lambda x=x, w=w: F.linear(x, w), repeats)
        out["read_bytes_per_s"] = read_bandwidth(read_buffer(quick), repeats)
    return out


def run_worker(spec: dict) -> dict:
    """One (library, dtype, measurement) in this fresh process."""
    import torch
    torch.set_num_threads(spec["threads"])
    if spec["what"] == "bounds":
        return measure_ceilings(spec["quick"])
    shape, work = shape_for(spec["quick"], spec.get("moe", False))
    dtype = getattr(torch, spec["dtype"])
    runner = SiroccoRunner(spec["backend"]) if spec["library"] == "sirocco" else TransformersRunner()
    runner.imports()
    rss_before = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    runner.load(Path(spec["path"]), dtype)
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - t0,
                              "load_peak_bytes": (proc_status_kib("VmHWM") - rss_before) * 1024,
                              "imports_rss_bytes": rss_before * 1024,
                              "params": sum(p.numel() for p in runner.model.parameters())}
    what, reps = spec["what"], spec["repeats"]
    vocab = shape.vocab_size
    if what == "load":
        # Memory-mapped weights become resident only when first used: the honest peak includes a first token.
        result.update(runner.prepare([1], 16))
        runner.generate(random_prompts([8], vocab, seed=4), 1)
        result["first_token_peak_bytes"] = (proc_status_kib("VmHWM") - rss_before) * 1024
        return result
    if what == "prefill":
        [prompt] = random_prompts([work.prefill_len], vocab, seed=1)
        result.update(runner.prepare([1], work.prefill_len + 2))
        t, tokens = timed(lambda: runner.generate([prompt], 1), reps)
        result.update(seconds=t, tokens_per_s=work.prefill_len / t, tokens=tokens)
    elif what == "decode":
        [prompt] = random_prompts([work.decode_prompt], vocab, seed=2)
        n = work.decode_tokens
        result.update(runner.prepare([1], work.decode_prompt + n + 1))
        t1, _ = timed(lambda: runner.generate([prompt], 1), reps)
        tn, tokens, probes = timed_with_probes(lambda: runner.generate([prompt], n), reps,
                                               bandwidth_probe(spec["quick"]))
        result.update(seconds=tn - t1, tokens_per_s=(n - 1) / (tn - t1), tokens=tokens,
                      bandwidth_probes=probes)
    elif what == "batch":
        prompts = random_prompts(work.batch_lengths, vocab, seed=3)
        n = work.batch_tokens
        result.update(runner.prepare([len(prompts)], max(work.batch_lengths) + n + 1))
        # The warm-up runs every path (packed or padded pre-fill, 8-row decode) on a smaller batch.
        runner.generate([p[:10 * (i + 1)] for i, p in enumerate(prompts)], 4)
        t, tokens = timed(lambda: runner.generate(prompts, n), reps, warm_up=False)
        result.update(seconds=t, tokens_per_s=len(prompts) * n / t, tokens=tokens)
    result["peak_bytes"] = proc_status_kib("VmHWM") * 1024
    if what in ("prefill", "decode"):
        del runner                                                    # free the weights before the big buffer
        result["ceilings"] = measure_ceilings(spec["quick"])          # the machine right after the timing
    return result


def spawn(spec: dict, log: Callable[[str], None], script: Path = Path(__file__), label: str = "") -> dict:
    """Run one worker of ``script`` (``--worker SPEC --result FILE``) in a new Python process; its result comes back
    through a JSON file. ``label`` names the worker in a failure's message."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TRANSFORMERS_VERBOSITY="error",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, str(script.resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            name = label or f"{spec['library']} {spec['dtype']} {spec['what']}"
            log(f"  {name} failed (exit {proc.returncode}):\n{tail}")
            return {"error": tail}
        return json.loads(result.read_text())


# -- the report ---------------------------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict, bounds: dict, spread: dict, shape: Shape, work: Workload,
           dtypes: list[str]) -> tuple[list[str], list[dict]]:
    """Markdown tables of figures and targets; also the targets as records for --json."""
    def ceiling(key, unit, scale, digits):
        lo, hi = spread.get(key, (0.0, 0.0))
        return f"{hi / scale:.{digits}f} {unit} (lowest {lo / scale:.{digits}f})"

    kind = "Mixtral" if shape.moe else "Mistral"
    lines = [f"Model: {kind} shape {shape.name}, {shape.params / 1e9:.2f}B parameters, random weights.",
             "Ceilings, best of the measurements in this run: "
             f"bf16 matmul {ceiling('matmul_flops_bfloat16', 'GFLOP/s', 1e9, 0)}, "
             f"fp32 matmul {ceiling('matmul_flops_float32', 'GFLOP/s', 1e9, 0)}, "
             f"read bandwidth {ceiling('read_bytes_per_s', 'GB/s', 1e9, 1)}.",
             f"Bounds: decode = bandwidth / bytes of the {shape.decode_read_params / 1e6:,.0f}M weights a step reads; "
             f"pre-fill = matmul rate / (2 x {shape.layer_params / 1e6:,.0f}M layer weights) FLOPs per token.", "",
             "| dtype | measurement | sirocco | transformers | ratio | bound | sirocco / bound |",
             "|---|---|---|---|---|---|---|"]
    targets: list[dict] = []
    probed: list[str] = []

    def get(lib, dtype, what, key):
        r = results.get((lib, dtype, what), {})
        return r.get(key) if "error" not in r else None

    def fmt(x, unit):
        return "–" if x is None else f"{x:,.1f}{unit}"

    for dtype in dtypes:
        rate = bounds.get(f"matmul_flops_{dtype}")
        bw = bounds.get("read_bytes_per_s")
        bound = {"prefill": rate / (2 * shape.layer_params) if rate else None,
                 "decode": shape.decode_bound(bw, dtype) if bw else None}
        label = {"prefill": f"pre-fill {work.prefill_len} tokens (tokens/s)",
                 "decode": "decode, batch 1 (tokens/s)",
                 "batch": f"{len(work.batch_lengths)} prompts {min(work.batch_lengths)}..{max(work.batch_lengths)}"
                          f" + {work.batch_tokens} tokens (generated tokens/s)"}
        for what in ("prefill", "decode", "batch"):
            s, t = get("sirocco", dtype, what, "tokens_per_s"), get("transformers", dtype, what, "tokens_per_s")
            if s is None and t is None:
                continue
            ratio = s / t if s and t else None
            b = bound.get(what)
            frac = s / b if s and b else None
            lines.append(f"| {dtype} | {label[what]} | {fmt(s, '')} | {fmt(t, '')} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}x'} | {fmt(b, '')} | "
                         f"{'–' if frac is None else f'{frac:.0%}'} |")
            if what == "decode":
                probes = get("sirocco", dtype, what, "bandwidth_probes")
                near = shape.decode_bound(max(probes), dtype) if probes else None
                near_frac = s / near if s and near else None
                probed.append(f"{dtype}: read bandwidth probed between sirocco's decode runs "
                              f"{min(probes) / 1e9:.1f}-{max(probes) / 1e9:.1f} GB/s; against the highest, the "
                              f"bound is {near:.1f} tokens/s and sirocco reaches {near_frac:.0%} of it"
                              if near_frac else f"{dtype}: no bandwidth probes")
            if what == "decode" and dtype == "bfloat16":
                targets += [dict(target="bf16 decode >= 1.8x transformers", value=ratio, ok=ratio and ratio >= 1.8),
                            dict(target="bf16 decode >= 60% of bandwidth bound (best bandwidth of the run)",
                                 value=frac, ok=frac and frac >= 0.6),
                            dict(target="bf16 decode >= 60% of bandwidth bound (best probe around the decode runs)",
                                 value=near_frac, ok=near_frac and near_frac >= 0.6)]
            if what == "prefill" and dtype == "bfloat16":
                targets += [dict(target="bf16 pre-fill >= 1.0x transformers", value=ratio,
                                 ok=ratio and ratio >= 1.0),
                            dict(target="bf16 pre-fill >= 75% of matmul bound", value=frac, ok=frac and frac >= 0.75)]
            if what == "batch":
                targets.append(dict(target=f"{dtype} mixed batch >= 2x transformers (padded)", value=ratio,
                                    ok=ratio and ratio >= 2.0))
    if probed:
        lines += [""] + [f"- {p}" for p in probed]
    memory = []
    for dtype in dtypes:
        wbytes = results.get(("weights", dtype))
        for lib in LIBRARIES:
            peak = get(lib, dtype, "load", "load_peak_bytes")
            if peak is None:
                continue
            first = get(lib, dtype, "load", "first_token_peak_bytes")
            memory.append(f"| {dtype} | {lib} | {wbytes / 1e9:.2f} | {peak / 1e9:.2f} | {first / 1e9:.2f} | "
                          f"{first / wbytes:.2f}x | {get(lib, dtype, 'load', 'load_seconds'):.1f} |")
            if lib == "sirocco":
                targets.append(dict(target=f"{dtype} sirocco peak memory <= 1.2x weights", value=first / wbytes,
                                    ok=first <= 1.2 * wbytes))
    if memory:
        lines += ["", "Peak resident memory above the process's size after imports (mapped weights count once "
                  "touched, hence the column after a first token):", "",
                  "| dtype | library | weights (GB) | peak, load (GB) | peak, load + first token (GB) | "
                  "/ weights | load (s) |", "|---|---|---|---|---|---|---|"] + memory
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for t in targets:
        v = t["value"]
        shown = "–" if v is None else (f"{v:.0%}" if "%" in t["target"] else f"{v:.2f}x")
        t["ok"] = bool(t["ok"])
        lines.append(f"| {t['target']} | {shown} | {check(t['ok'])} |")
    return lines, targets


def agreement(results: dict, dtypes: list[str]) -> list[str]:
    """How many leading greedy tokens sirocco and transformers share, per run that generated tokens."""
    out = []
    for dtype in dtypes:
        for what in ("prefill", "decode", "batch"):
            a = results.get(("sirocco", dtype, what), {}).get("tokens")
            b = results.get(("transformers", dtype, what), {}).get("tokens")
            if not a or not b:
                continue
            prefix = [common_prefix(x, y) for x, y in zip(a, b, strict=True)]
            n = len(a[0])
            first = min(4, n)
            out.append(f"{dtype} {what}: {sum(p >= first for p in prefix)}/{len(prefix)} sequences agree on the first "
                       f"{first} tokens; agreeing prefix per sequence {prefix} of {n}")
    return out


# -- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from: " + ", ".join(DTYPES))
    ap.add_argument("--only", default=",".join(MEASUREMENTS),
                    help="comma-separated measurements, from: " + ", ".join(MEASUREMENTS))
    ap.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated, from: " + ", ".join(LIBRARIES))
    ap.add_argument("--quick", action="store_true", help="a small shape and workload: seconds, for smoke tests")
    ap.add_argument("--moe", action="store_true",
                    help="the Mixtral shape (dim 1024, 8 layers, 8 experts of 3584, top 2) instead of the Mistral one")
    ap.add_argument("--workdir", type=Path, default=HERE / ".cache",
                    help="where the random checkpoints are written once and reused")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every measuring process")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    ap.add_argument("--backend", choices=("auto", "cpu", "torch"), default="auto",
                    help="what computes sirocco's model (backends/): as the engine decides (auto), the CPU "
                         "kernels, or the plain-PyTorch reference")
    ap.add_argument("--json", action="store_true", help="print one JSON document with every figure to stdout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name, allowed in (("dtypes", DTYPES), ("only", MEASUREMENTS), ("libraries", LIBRARIES)):
        values = [v.strip() for v in getattr(a, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"--{name}: {bad or 'nothing'} not in {', '.join(allowed)}")
        setattr(a, name, values)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if spec["what"] == "build":
            out = build_checkpoints(Path(spec["workdir"]), shape_for(spec["quick"], spec.get("moe", False))[0],
                                    spec["dtypes"])
        else:
            out = run_worker(spec)
        Path(a.result).write_text(json.dumps(out or {}))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    shape, work = shape_for(a.quick, a.moe)
    load_avg = os.getloadavg()[0]
    if load_avg > 0.5:
        log(f"warning: load average {load_avg:.2f} before starting: other work will slow these figures down")
    jiffies0, child0, wall0 = busy_jiffies(), own_cpu_seconds(), time.perf_counter()
    base = dict(quick=a.quick, moe=a.moe, threads=a.threads, repeats=a.repeats, workdir=str(a.workdir.resolve()),
                backend=a.backend)

    log(f"checkpoints under {a.workdir} ({shape.name})")
    built = spawn(dict(base, what="build", library="transformers", dtype=",".join(a.dtypes), dtypes=a.dtypes), log)
    if "error" in built:
        return 1
    from tqdm import tqdm
    jobs = [("ceilings", "-", "start")] + [(lib, dtype, what) for dtype in a.dtypes for what in a.only
                                           for lib in a.libraries] + [("ceilings", "-", "end")]
    results: dict = {}
    for dtype in a.dtypes:
        results[("weights", dtype)] = weight_bytes(checkpoint_dir(a.workdir, shape, dtype))
    bar = tqdm(jobs, desc="measuring", unit="run", file=sys.stderr)
    for lib, dtype, what in bar:
        bar.set_postfix_str(f"{lib} {dtype} {what}")
        spec = dict(base, what="bounds" if lib == "ceilings" else what, library=lib, dtype=dtype,
                    path=str(checkpoint_dir(a.workdir, shape, dtype)) if dtype != "-" else None)
        results[(lib, dtype, what)] = spawn(spec, bar.write)
        partial = a.workdir / "last-run.json"                        # survives an interrupted run
        partial.write_text(json.dumps([dict(library=k[0], dtype=k[1], measurement=k[2], **v)
                                       for k, v in results.items() if isinstance(v, dict)], indent=1))
    # Ceilings: the best seen in the run (before, after, and right after each pre-fill and decode timing).
    seen = [results.pop(("ceilings", "-", "start")), results.pop(("ceilings", "-", "end"))]
    seen += [r["ceilings"] for r in results.values() if isinstance(r, dict) and "ceilings" in r]
    seen = [c for c in seen if "error" not in c]
    bounds = {key: max(c[key] for c in seen) for key in seen[0]} if seen else {}
    spread = {key: (min(c[key] for c in seen), max(c[key] for c in seen)) for key in bounds}

    wall = time.perf_counter() - wall0
    busy1 = busy_jiffies()
    ticks = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    others = ((busy1[0] - jiffies0[0]) / ticks - (own_cpu_seconds() - child0)) / (wall * ncpu)
    lines, targets = report(results, bounds, spread, shape, work, a.dtypes)
    agree = agreement(results, a.dtypes)
    fast = {dtype: results.get(("sirocco", dtype, "decode"), {}).get("fast_decode") for dtype in a.dtypes}
    notes = [f"sirocco's backend ({a.backend}): "
             + ", ".join(f"{d} {'used' if f else 'not used' if f is not None else 'not measured'}"
                         for d, f in fast.items()),
             "transformers attention: "
             f"{results.get(('transformers', a.dtypes[0], 'batch'), {}).get('attn_implementation', '?')}",
             f"run: {wall / 60:.1f} min, {a.threads} threads, median of {a.repeats} after a warm-up; other processes "
             f"used {max(others, 0):.0%} of the {ncpu} CPUs meanwhile"
             + (" (figures contaminated)" if others > 0.1 else "")]
    table = "\n".join(lines + [""] + [f"- {x}" for x in agree + notes])
    if a.json:
        log(table)                                       # the tables for people, the JSON for scripts
        print(json.dumps({"shape": asdict(shape), "workload": asdict(work), "ceilings": bounds,
                          "ceilings_lowest": {k: v[0] for k, v in spread.items()},
                          "weights_bytes": {d: results[("weights", d)] for d in a.dtypes},
                          "results": [dict(library=k[0], dtype=k[1], measurement=k[2], **v)
                                      for k, v in results.items() if k[0] in LIBRARIES],
                          "targets": targets, "agreement": agree, "notes": notes,
                          "other_cpu_share": others}, indent=1))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
