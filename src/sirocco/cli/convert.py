"""``sirocco convert``: rewrite a checkpoint folder in the other published format (or the same one, in another
dtype). Tensors are checked against the config before anything is written, and the tokenizer files travel
with the weights."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

from ..checkpoint import CONSOLIDATED, HF, read_state_dict, save_consolidated, save_hf
from ..errors import SiroccoError
from .options import DTYPES, size_bytes

log = logging.getLogger(__name__)

TOKENIZER_FILES = re.compile(r"(tokenizer\.model(\.v\d+)?|.*\.model\.v\d+|tekken.*\.json|tokenizer\.json|"
                             r"tokenizer_config\.json|special_tokens_map\.json)")

DESCRIPTION = """Rewrite a checkpoint in Mistral's consolidated format (params.json + consolidated.safetensors)
or Hugging Face's (config.json + model.safetensors, sharded with an index above --max-shard-size). The names,
the q/k row order of the attention projections and the config are translated; a round trip gives back the
same tensors bit for bit. Tokenizer files are copied along."""

EXAMPLES = """examples:
  sirocco convert ./Mistral-7B-v0.1-hf ./mistral-7b              # Hugging Face -> consolidated
  sirocco convert ./mistral-7b ./mistral-7b-hf --to hf --max-shard-size 5GB
  sirocco convert ./mistral-7b ./mistral-7b-bf16 --to consolidated --dtype bfloat16"""


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", help="checkpoint folder to read (either format)")
    p.add_argument("destination", help="folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--to", choices=[CONSOLIDATED, HF], default=None,
                   help="format to write (default: the other one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the weights (default: keep the stored dtype)")
    p.add_argument("--max-shard-size", type=size_bytes, default=None, metavar="SIZE",
                   help="Hugging Face format only: split into shards of at most SIZE (e.g. 5GB, 500MB, 2GiB; "
                        "a bare number is bytes)")
    p.add_argument("--force", action="store_true", help="write into a non-empty destination folder")
    p.add_argument("--json", action="store_true", help="print a JSON summary on standard output")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.source), Path(args.destination)
    if dst.exists() and src.resolve() == dst.resolve():
        raise SiroccoError("source and destination are the same folder")
    if args.to == CONSOLIDATED and args.max_shard_size is not None:     # before reading the whole checkpoint
        raise SiroccoError("--max-shard-size applies to the Hugging Face format only")
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise SiroccoError(f"{dst} exists and is not empty; choose another folder or pass --force")
    model_args, state, layout = read_state_dict(src)
    target = args.to or (HF if layout.format == CONSOLIDATED else CONSOLIDATED)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if target == HF:
        save_hf(state, model_args, dst, dtype=dtype, max_shard_bytes=args.max_shard_size)
    else:
        if args.max_shard_size is not None:
            raise SiroccoError("--max-shard-size applies to the Hugging Face format only")
        save_consolidated(state, model_args, dst, dtype=dtype)
    copied = [f.name for f in sorted(src.iterdir()) if f.is_file() and TOKENIZER_FILES.fullmatch(f.name)]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    n = sum(t.numel() for t in state.values())
    summary = {"source": str(src), "source_format": layout.format, "destination": str(dst), "format": target,
               "tensors": len(state), "parameters": n, "tokenizer_files": copied,
               "dtype": args.dtype or "as stored"}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{src} ({layout.format}) -> {dst} ({target}): {len(state)} tensors, {n / 1e6:.1f}M parameters, "
              f"dtype {summary['dtype']}; tokenizer files copied: {', '.join(copied) or 'none'}", file=sys.stderr)
    return 0
