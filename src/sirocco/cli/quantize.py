"""``sirocco quantize``: write a model as a GGUF file of q8_0 or q4_0 blocks that llama.cpp (and sirocco) load."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..backends import quant
from ..checkpoint import is_gguf
from ..errors import SiroccoError
from ..pretrained import DEMO, load, model_folder
from ..tokenizer.sentencepiece_model import SentencePieceTokenizer
from .options import DTYPES, add_progress_argument

log = logging.getLogger(__name__)

DESCRIPTION = """Quantize a model's linear layers to GGUF blocks and write one .gguf file with the config, the
sentencepiece tokenizer and the tensors, in llama.cpp's names and metadata keys. The blocks are the ones
'--quantize int8/int4' computes at load, so sirocco runs the file exactly as it runs the model quantized at load.
What is quantized: attention and feed-forward weights (every expert's) to --type; the output head to q8_0 in both
cases (llama.cpp's quantize gives it more bits too: q6_K for q4_0, a format sirocco does not have). Kept in float:
norms and the MoE router in F32 (as llama.cpp keeps them), the token embedding in --dtype (llama.cpp's quantize
would quantize it; sirocco keeps embeddings in float, so the file holds exactly what sirocco runs)."""

EXAMPLES = """examples:
  sirocco quantize ./Mistral-7B-v0.1 mistral-7b-q8_0.gguf --type q8_0
  sirocco quantize sirocco-tiny tiny-q4_0.gguf --type q4_0 --json
  sirocco generate --model tiny-q4_0.gguf "The sliding window\""""


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", help="a checkpoint folder (either format) or a bundled model's name, with a "
                                  "sentencepiece tokenizer.model")
    p.add_argument("destination", help="the .gguf file to write")
    p.add_argument("--type", choices=quant.FORMATS, required=True, help="block format of the linear layers")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                   help="type of the float tensors other than norms and router (the token embedding)")
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
    # fp32 is exact for every stored dtype; each linear weight is quantized as it is read, as --quantize does
    loaded = load(str(src), dtype=torch.float32, quantize=args.type, backend="torch")
    if not isinstance(loaded.tokenizer, SentencePieceTokenizer) or not tokenizer_model.is_file():
        raise SiroccoError(f"{src}: GGUF's 'llama' vocabulary is written from a sentencepiece tokenizer.model; this "
                           f"folder's tokenizer is {loaded.tokenizer.describe()}")
    # Imported here, not at the top: the gguf package it needs is slow to import, and every verb's module is
    # imported to build the parser of each command.
    from ..checkpoint.gguf_write import save_gguf

    progress = None if not args.no_progress else False
    report = loaded.quantized
    assert report is not None
    info = save_gguf(loaded.model, dst, tokenizer_model, float_dtype=DTYPES[args.dtype],
                     name=src.name, progress=progress if progress is not None else sys.stderr.isatty())
    summary = {"source": str(src), "destination": str(dst), "type": args.type, "output_type": quant.HEAD_FORMAT,
               "float_dtype": args.dtype, "quantized_layers": report.layers,
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
