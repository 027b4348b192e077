"""``sirocco quantize``: write a model as a GGUF file of one of llama.cpp's quantization mixes (or sirocco's q8_0 and
q4_0) that llama.cpp and sirocco load."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .. import backends
from ..backends.quant import resolve
from ..checkpoint import is_gguf, read_model
from ..errors import SiroccoError
from ..pretrained import DEMO, model_folder
from ..tokenizer import load_tokenizer
from ..tokenizer.sentencepiece_model import SentencePieceTokenizer
from .options import DTYPES, add_progress_argument

log = logging.getLogger(__name__)

# --type: the mixes, each with one line of what it holds (the rules are backends/quant/mixes.py's)
MIXES = {
    "q8_0": "sirocco's: attention and feed-forward q8_0 (8.5 bits per weight), head q8_0, embedding --dtype",
    "q4_0": "sirocco's: attention and feed-forward q4_0 (4.5 bits), head q8_0, embedding --dtype",
    "q4_K_M": "q4_K (4.5 bits); q6_K: head, attention-v and ffn-down in the first/last 8th and every 3rd layer",
    "q5_K_M": "q5_K (5.5 bits); q6_K: head, attention-v and ffn-down in the layers q4_K_M promotes",
    "q6_K": "q6_K (6.56 bits) everywhere",
    "q3_K_M": "q3_K (3.44 bits); q4_K-q5_K: attention-v, ffn-down, attention-output; head q6_K",
    "q2_K": "q2_K (2.63 bits); q3_K: ffn-down, attention-output; attention-v q4_K (GQA >= 4) or q3_K; head q6_K",
    "iq4_xs": "iq4_xs (4.25 bits, non-linear codebook); q5_K: attention-v (GQA >= 4), ffn-down in the 1st 8th",
}

DESCRIPTION = """Quantize a model's weights to GGUF blocks and write one .gguf file with the config, the sentencepiece
tokenizer and the tensors, in llama.cpp's names and metadata keys. The blocks are the ones '--quantize MIX'
computes at load, so sirocco runs the file exactly as it runs the model quantized at load.

mixes (--type, any case):
""" + "\n".join(f"  {name:<7} {text}" for name, text in MIXES.items()) + """

The K mixes are llama.cpp's (llama-quantize's, without an importance matrix): which tensor gets which type, the
scales and mins found by ggml's searches, the token embedding stored in the mix's default type (sirocco reads it
back dequantized); a Mixtral of 8 experts gets attention-v and -k q8_0 and (but in q5_K_M and q6_K)
attention-output q5_K. Where a row's length (K) is not a multiple of 256, a K type falls back per tensor to q5_0
(q4_K), q5_1 (q5_K), q8_0 (q6_K), q4_0 (q2_K, q3_K) or iq4_nl (iq4_xs), and where 32 does not divide it either,
to --dtype. In every mix the norms and the MoE router are F32 (as llama.cpp keeps them)."""

EXAMPLES = """examples:
  sirocco quantize ./Mistral-7B-v0.1 mistral-7b-q4_K_M.gguf --type q4_K_M
  sirocco quantize sirocco-tiny tiny-q4_0.gguf --type q4_0 --json
  sirocco generate --model tiny-q4_0.gguf "The sliding window\""""


def mix_type(text: str) -> str:
    """``--type``: a mix of ``MIXES``, in any case, as spelled there."""
    for name in MIXES:
        if name.lower() == text.lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not a mix; choose one of {', '.join(MIXES)}")


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", help="a checkpoint folder (either format) or a bundled model's name, with a "
                                  "sentencepiece tokenizer.model")
    p.add_argument("destination", help="the .gguf file to write")
    p.add_argument("--type", type=mix_type, required=True, metavar="MIX",
                   help=f"the mix: {', '.join(MIXES)} (described above)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                   help="type of the float tensors other than norms and router: the token embedding in q8_0 and "
                        "q4_0, linear layers whose rows fit no block")
    p.add_argument("--force", action="store_true", help="overwrite the destination file")
    p.add_argument("--json", action="store_true", help="print a JSON summary on standard output")
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    dst = Path(args.destination)
    if dst.suffix.lower() != ".gguf":
        raise SiroccoError(f"{dst}: the destination must be a .gguf file")
    if dst.exists() and not args.force:
        raise SiroccoError(f"{dst} exists; choose another name or pass --force")
    if args.source == DEMO:
        raise SiroccoError(f"{DEMO} is random weights with Mistral's v1 tokenizer; quantize a checkpoint")
    src = model_folder(args.source)
    if is_gguf(src):
        raise SiroccoError(f"{src} is already a GGUF file; quantize a checkpoint folder")
    tokenizer_model = src / "tokenizer.model"
    tokenizer = load_tokenizer(src)
    if not isinstance(tokenizer, SentencePieceTokenizer) or not tokenizer_model.is_file():
        raise SiroccoError(f"{src}: GGUF's 'llama' vocabulary is written from a sentencepiece tokenizer.model; this "
                           f"folder's tokenizer is {tokenizer.describe()}")
    # Imported here, not at the top: the gguf package it needs is slow to import, and every verb's module is
    # imported to build the parser of each command.
    from ..checkpoint.gguf_write import save_gguf

    progress = False if args.no_progress else sys.stderr.isatty()
    mix = resolve(args.type)
    # fp32 is exact for every stored dtype; each linear weight is quantized as it is read, as --quantize does, and
    # the pass hands back the embedding's blocks where the mix stores it quantized
    parts = read_model(src, dtype=torch.float32, progress=progress, quantize=mix)
    conversion = backends.attach(parts.model, "torch", quantize=mix, blocks=parts.blocks, progress=progress)
    report = conversion.quantized
    assert report is not None and parts.model.output is not None
    info = save_gguf(parts.model, dst, tokenizer_model, float_dtype=DTYPES[args.dtype], name=src.name,
                     progress=progress, mix=mix, embedding=conversion.embedding)
    head = parts.model.output
    summary = {"source": str(src), "destination": str(dst), "type": args.type, "mix": mix,
               "output_type": getattr(head, "fmt", args.dtype),
               "embedding_type": conversion.embedding.fmt if conversion.embedding is not None else args.dtype,
               "float_dtype": args.dtype, "quantized_layers": report.layers, "layer_types": report.types,
               "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
               "file_bytes": info["file_bytes"], "tensors": info["tensors"]}
    log.info("%s -> %s: %.1f MiB of weights -> %.1f MiB file", src, dst, report.bytes_before / 2**20,
             info["file_bytes"] / 2**20)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{src} -> {dst} ({args.type}): {report.bytes_before / 2**20:.1f} MiB -> "
              f"{info['file_bytes'] / 2**20:.1f} MiB; tensors " +
              ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items())), file=sys.stderr)
    return 0
