"""Options more than one verb shares, declared once: the model to load and where it runs, the progress bar, and
pipeline ranks; and the ``type=`` validators every verb's options use, so that argparse refuses a bad value where
it is parsed (``sirocco VERB: error: argument --top-p: 2.0 is out of range: must be in (0, 1]``, exit status 2)."""

from __future__ import annotations

import argparse
import codecs
import math
import re
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from ..backends.quant.convert import QUANTIZE
from ..distributed.launch import DEFAULT_TIMEOUT_S
from ..errors import SiroccoError
from ..pretrained import DEFAULT_MODEL, DEMO, Loaded, bundled_models, load

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- validators: argparse ``type=`` callables ------------------------------------------------------------------
def _bound(x: float) -> str:
    """A bound as the messages print it: 0.5, 1, 2**63, 2**63 - 1, -2**63."""
    if isinstance(x, int) and abs(x) >= 2**20:
        for k in range(20, 128):
            if abs(x) == 2**k:
                return f"{'-' if x < 0 else ''}2**{k}"
            if x == 2**k - 1:
                return f"2**{k} - 1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(lo: Optional[float], hi: Optional[float], lo_open: bool = False, hi_open: bool = False) -> str:
    """'>= 1', '> 0', '<= 1', 'in (0, 1]'."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_bound(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_bound(hi)}"
    return "any value"


def _number(kind: type, lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool
            ) -> Callable[[str], float]:
    allowed = range_text(lo, hi, lo_open, hi_open)
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}" + ("" if lo is hi is None
                                                                          else f" (must be {allowed})")) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number"
                                             + ("" if lo is hi is None else f" (must be {allowed})"))
        if ((lo is not None and (value <= lo if lo_open else value < lo))
                or (hi is not None and (value >= hi if hi_open else value > hi))):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {allowed}")
        return value

    parse.__name__ = f"{kind.__name__} {allowed}"
    return parse


def int_in(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either bound may be None: unbounded)."""
    return _number(int, lo, hi, False, False)  # type: ignore[return-value]   # int(...) of the text


def int_at_least(n: int) -> Callable[[str], int]:
    """An integer >= n."""
    return int_in(n, None)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval from lo to hi, each end closed unless ``lo_open`` / ``hi_open``."""
    return _number(float, lo, hi, lo_open, hi_open)


positive_float = float_in(0, None, lo_open=True)
non_negative_float = float_in(0, None)

#: Seeds of torch.Generator: it takes any 64-bit integer, signed or not; a prompt's seed is seed + its index.
SEED = int_in(-2**63, 2**63 - 1)


def non_empty(text: str) -> str:
    """A string with at least one character."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_bytes(text: str) -> int:
    """A size in bytes, at least 1: '5GB' -> 5 * 10**9, '500MB', '2GiB', '1.5KB', '1000' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected a number of bytes, or one with a unit "
                                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) like 5GB, 500MB or 2GiB")
    n = int(float(m[1]) * SIZE_UNITS[(m[2] or "B").upper()])
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be at least 1 byte")
    return n


def first_bad_utf8(f: BinaryIO, chunk_bytes: int = 1 << 20) -> Optional[tuple[int, int, str]]:
    r"""The first byte of ``f`` that is not valid UTF-8, as (offset in bytes, the byte, why), or None; read in
    chunks, so a large file is never held whole. A sequence cut at the end of a chunk is held over to the next:
    with chunks of 2 bytes, b"a\xc3\xa9\xff" gives (3, 0xff, 'invalid start byte'), not an error at byte 1.

    >>> import io
    >>> first_bad_utf8(io.BytesIO(b"a\xc3\xa9\xff"), chunk_bytes=2)
    (3, 255, 'invalid start byte')
    >>> first_bad_utf8(io.BytesIO("caf\u00e9\n".encode()), chunk_bytes=4) is None
    True
    >>> first_bad_utf8(io.BytesIO(b"ok\xe2\x82"))          # cut short at the end of the file
    (2, 226, 'unexpected end of data')
    """
    held, start = b"", 0                # bytes of a sequence not yet complete, and the offset of held[0]
    while True:
        data = f.read(chunk_bytes)
        block = held + data
        try:
            _, used = codecs.utf_8_decode(block, "strict", not data)
        except UnicodeDecodeError as e:
            return start + e.start, block[e.start], e.reason
        if not data:
            return None
        held, start = block[used:], start + used


def utf8_text_file(text: str) -> str:
    """The path of a readable file of UTF-8 text (returned as given). The file is read through once here, so a
    missing, unreadable or binary file is refused where the option is parsed, naming the offset of the first
    byte that is not UTF-8; the verb reads it again when it runs."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            bad = first_bad_utf8(f)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {e.strerror or e}") from None
    if bad is not None:
        offset, byte, reason = bad
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} "
                                         f"({reason})")
    return text


def device_name(text: str) -> str:
    """A device torch can name (cpu, cuda, cuda:1, mps, ...); whether it is present is checked when it is used."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected cpu, cuda, cuda:N, ...") from None
    return text


def add_machine_arguments(g: argparse._ActionsContainer) -> None:
    """--device and --threads."""
    g.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for PyTorch, at least 1 (default: all cores)")


def add_sampling_arguments(g: argparse._ActionsContainer, max_tokens: int, seed: Optional[int] = 0,
                           per: str = "prompt") -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed: how generate, chat and serve's CLI continue text."""
    g.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                   help=f"most tokens to generate per {per}, at least 1 (default {max_tokens})")
    g.add_argument("--temperature", type=non_negative_float, default=0.7,
                   help=">= 0; 0 is greedy decoding (default 0.7)")
    g.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=0.95,
                   help="nucleus sampling mass to keep, in (0, 1]; 1 keeps all (default 0.95)")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="keep only the k most likely tokens; 0 keeps all")
    g.add_argument("--seed", type=SEED, default=seed,
                   help=f"random seed, a 64-bit signed integer; {per} i samples with seed + i (default {seed})")


DEFAULT_PREFIX_CACHE_MIB = 1024


def add_engine_arguments(g: argparse._ActionsContainer, rows: bool = True, chunks: bool = True,
                         max_seq_len: bool = False, prefix_cache: bool = False) -> None:
    """The engine's sizes and what computes the model: --max-rows, --chunk-size, --max-batch-tokens,
    --max-seq-len and --prefix-cache-mib (where asked), --attention, --backend."""
    from ..backends import BACKENDS
    if rows:
        g.add_argument("--max-rows", type=positive_int, default=8,
                       help="most sequences generated at once, at least 1 (default 8)")
    if chunks:
        g.add_argument("--chunk-size", type=positive_int, default=None,
                       help="pre-fill at most this many tokens of a prompt per step, at least 1 (default: the "
                            "sliding window)")
        g.add_argument("--max-batch-tokens", type=positive_int, default=None,
                       help="most tokens in one step, over all sequences, at least 1 (default 4 x chunk size)")
    if max_seq_len:
        g.add_argument("--max-seq-len", type=positive_int, default=None,
                       help="longest prompt + generation in tokens; sizes the cache (default: the model's context)")
    if prefix_cache:
        g.add_argument("--prefix-cache-mib", type=non_negative_float, default=DEFAULT_PREFIX_CACHE_MIB, metavar="MIB",
                       help="keep the pre-filled state of prompts in a store of this many MiB (keys and values of "
                            "every layer; least recently used first out), so a prompt that starts with a stored "
                            "one, such as a chat's next turn, pre-fills only what is new; 0 turns it off (default "
                            f"{DEFAULT_PREFIX_CACHE_MIB})")
    g.add_argument("--attention", choices=["per_sequence", "dense"], default="per_sequence",
                   help="pre-fill attention: one call per sequence (fast) or one explicit mask (reference)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what computes the model: torch (the plain-PyTorch reference), cpu (C++ decode kernels, "
                        "built once at first use), auto (cpu for CPU models of 256 MiB or more)")


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    """The engine's ``prefix_cache_bytes`` from --prefix-cache-mib."""
    return int(args.prefix_cache_mib * SIZE_UNITS["MIB"])


def add_progress_argument(g: argparse._ActionsContainer) -> None:
    """--no-progress."""
    g.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")


def quantization(text: str) -> str:
    """A ``--quantize`` mix, in any case, as ``QUANTIZE`` spells it: ``Q4_K_M`` -> ``q4_K_M``, ``INT8`` -> ``int8``."""
    for name in QUANTIZE:
        if name.lower() == text.lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not a quantization mix; choose one of {', '.join(QUANTIZE)}")


QUANTIZE_HELP = ("quantize the linear layers at load with a mix of GGUF block types (any case): q8_0 (or int8) "
                 "and q4_0 (or int4), every attention and feed-forward weight in that type and the output head "
                 "q8_0; or llama.cpp's q4_K_M, q5_K_M, q6_K, q3_K_M, q2_K, iq4_xs, its type per tensor and the "
                 "embedding rounded through the mix's type as its files store it ('sirocco quantize --help' "
                 "describes each). Norms and the MoE router stay in --dtype")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantize, --device, --threads: what every verb that runs a model takes."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a checkpoint folder (consolidated or Hugging Face format), a .gguf file, or a bundled "
                        "model's name: "
                        f"{', '.join(bundled_models() + [DEMO])} (default: {DEFAULT_MODEL}; '{DEMO}' is random "
                        "weights, for plumbing)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations dtype (default float32; bfloat16 halves memory and is faster "
                        "for large models on CPUs with AVX512-BF16)")
    g.add_argument("--quantize", type=quantization, default=None, metavar="MIX", help=QUANTIZE_HELP)
    add_machine_arguments(g)


def add_pipeline_arguments(p: argparse.ArgumentParser, training: bool = False) -> None:
    """The pipeline options of the generate verb, or of the train verb with ``training``."""
    g = p.add_argument_group("pipeline parallelism (start with torchrun --nproc-per-node N)")
    g.add_argument("--pipeline-ranks", type=positive_int, default=1, metavar="N",
                   help="split the model's layers into N stages, one per process started by torchrun "
                        "(default 1: no split)")
    if training:
        g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], default="gpipe",
                       help="order of the micro-batches' forwards and backwards (the recipe's accum "
                            "micro-batches of each step): gpipe, or 1f1b which holds fewer activations")
    else:
        g.add_argument("--micro-batches", type=positive_int, default=None, metavar="M",
                       help="groups of sequences per step that flow through the stages at the same time "
                            "(default: N; 1 runs each step's batch whole)")
    g.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="longest wait for another rank before failing, > 0 (default %(default)s)")
    g.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                   help="process-group backend (default: nccl with CUDA, else gloo)")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: None is cuda where available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SiroccoError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SiroccoError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_from_args(args: argparse.Namespace) -> Loaded:
    """The model and tokenizer that --model, --dtype, --device and --threads name, quantized if --quantize says so,
    on --backend with --attention's pre-fill path (verbs without those options: the plain-PyTorch reference)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device),
                quantize=getattr(args, "quantize", None), backend=engine_backend(args),
                prefill=getattr(args, "attention", "per_sequence"))


def engine_backend(args: argparse.Namespace) -> Optional[str]:
    """The backend --backend asks for, or the one speculative decoding needs: with --speculate, "auto" is "cpu"
    (its row-exact kernels), and "torch" is refused."""
    backend = getattr(args, "backend", "torch")
    if getattr(args, "speculate", None) is not None:
        if backend == "torch":
            raise SiroccoError("--speculate needs --backend cpu (or auto): the plain PyTorch backend's products round "
                               "differently for different row counts, so verified drafts would change the output")
        return "cpu"
    return backend


# -- speculative decoding ------------------------------------------------------------------------------------------
def add_speculation_arguments(g: argparse._ActionsContainer) -> None:
    """--speculate, --draft-tokens, --ngram: speculative decoding, for generate, chat and serve."""
    from ..generate.speculation import ROW_EXACT_TOKENS
    g.add_argument("--speculate", default=None, metavar="ngram|PATH",
                   help="speculative decoding: 'ngram' (prompt lookup: the continuation of the longest recent n-gram "
                        "found earlier in the sequence) or a draft model (a folder, .gguf file or bundled name, with "
                        "this model's tokenizer). Greedy output is the same, bit for bit; it needs the cpu backend")
    g.add_argument("--draft-tokens", type=int_in(1, ROW_EXACT_TOKENS - 1), default=4, metavar="K",
                   help=f"most tokens drafted per sequence and step, 1 to {ROW_EXACT_TOKENS - 1} (default 4); each "
                        "sequence adapts its own to its acceptance")
    g.add_argument("--ngram", type=int_in(1, 16), default=3, metavar="N",
                   help="longest n-gram prompt lookup matches, 1 to 16 (default 3; it tries N down to 1)")


def speculation_from_args(args: argparse.Namespace, loaded: Optional[Loaded] = None):
    """The ``Speculation`` that --speculate and its options ask for (None without --speculate); a draft model is
    loaded as the target (``loaded``) was (--dtype, --device), and must encode text as its tokenizer does."""
    from ..generate.speculation import Speculation

    name = getattr(args, "speculate", None)
    if name is None:
        return None
    if name == "ngram":
        return Speculation("ngram", draft_tokens=args.draft_tokens, ngram=args.ngram)
    if loaded is None:
        raise SiroccoError(f"--speculate {name}: a draft model runs in one process, beside the whole model")
    draft = load(name, dtype=DTYPES[args.dtype], device=resolve_device(args.device), backend=engine_backend(args))
    probe = "The sliding window: 1, 2, 3 and caf\u00e9"
    if (draft.model.args.vocab_size != loaded.model.args.vocab_size
            or draft.tokenizer.encode(probe, bos=True, eos=False) != loaded.tokenizer.encode(probe, bos=True,
                                                                                          eos=False)):
        raise SiroccoError(f"--speculate {name}: the draft model's tokenizer ({draft.model.args.vocab_size} tokens) is "
                           f"not the model's ({loaded.model.args.vocab_size} tokens): a draft model needs the same")
    return Speculation(draft.model, draft_tokens=args.draft_tokens, ngram=args.ngram)
