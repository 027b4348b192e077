"""Write a GGUF file of a model shape with random weights directly in a quantization mix, tensor by tensor.

The float model is never built: each tensor is made in the type llama.cpp's mix gives it
(``sirocco.backends.quant.mixes.tensor_type``: ``q2_K`` for most of a Q2_K file, its promotions for attention-v,
feed-forward-down, the output head ...) as random blocks, and streamed to the file by the ``gguf`` package's writer
(all tensor infos first, then each tensor's bytes as soon as it is made), so the memory needed is about one tensor
(a Mixtral layer's stacked experts, 154 MB in q2_K) whatever the model's size. A block's quant and integer-scale
bits are uniform random bytes; its fp16 fields (``d``, ``dmin``, ``m``) are normal with a spread chosen per type
so that the weights' standard deviation is about ``--std`` (0.02, about a trained 7B's): finite, small values that
give finite logits through both sirocco and llama.cpp. Norms are ones (F32), the MoE router normal (F32), as
llama.cpp's quantizer leaves them; a tensor whose K fits no block of its type is F16, as llama.cpp writes it.

The metadata is what llama.cpp's converter writes for Mistral and Mixtral (architecture ``llama``: context
length, sizes, head counts, rope theta, norm epsilon, expert count and used count, ``general.file_type`` of the
mix) and the vocabulary of Mistral's v1 sentencepiece tokenizer (32000 tokens, mistral-common's
``tokenizer.model.v1``), or of the bundled sirocco-tiny tokenizer for a vocabulary smaller than that.

    python benchmarks/make_gguf.py --shape mixtral-8x7b --mix q2_K --out /big/mixtral-q2_K.gguf
    python benchmarks/make_gguf.py --shape mistral-7b --mix q4_K_M --out /big/mistral-q4_K_M.gguf
    python benchmarks/make_gguf.py --shape 1b --mix q6_K --out 1b.gguf
    python benchmarks/make_gguf.py --dim 256 --layers 2 --heads 4 --kv-heads 1 --hidden 512 --vocab 4096 \\
        --experts 4 --experts-used 2 --mix q4_K_M --out tiny.gguf

Shapes: ``mistral-7b`` (dim 4096, 32 layers, 32/8 heads, hidden 14336, vocab 32000), ``mixtral-8x7b`` (the same
with 8 experts, top 2) and ``1b`` (bench_quant.py's: dim 2048, 16 layers, 16/4 heads, hidden 7168, vocab 32000);
explicit ``--dim`` ... options override a preset's fields. It prints the file's summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES: dict[str, dict] = {
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                       rope_theta=1e6, experts=0, experts_used=0),
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                         rope_theta=1e6, experts=8, experts_used=2),
    "1b": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, hidden_dim=7168, vocab_size=32000,
               rope_theta=1e6, experts=0, experts_used=0),
}
MISTRAL_VOCAB = 32000          # tokenizer.model.v1's pieces


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: its GGUF name, its sirocco name (an expert stack's first expert's), its logical
    shape ((E,) N, K), and its block type (``q2_K``; None: float, ``float_type`` F32 or F16)."""
    gguf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: str | None
    float_type: str = "F32"


def model_args(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int, vocab_size: int,
               rope_theta: float = 1e6, experts: int = 0, experts_used: int = 0, max_seq_len: int = 32768,
               head_dim: int | None = None):
    from sirocco.config import ModelArgs, MoeArgs
    return ModelArgs(dim=dim, n_layers=n_layers, head_dim=head_dim or dim // n_heads, hidden_dim=hidden_dim,
                     n_heads=n_heads, n_kv_heads=n_kv_heads, norm_eps=1e-5, vocab_size=vocab_size,
                     rope_theta=rope_theta, max_seq_len=max_seq_len, sliding_window=None,
                     moe=MoeArgs(experts, experts_used) if experts else None)


def plan(args, mix: str) -> list[Planned]:
    """Every tensor of the model of ``args`` in llama.cpp's order and names, with the type ``mix`` gives it."""
    from sirocco.backends.quant.mixes import MixModel, tensor_type
    from sirocco.checkpoint.names import GGUF_EXPERTS, gguf_experts_name, to_gguf_name
    m = MixModel.of(args)
    out: list[Planned] = []

    def add(name: str, shape: tuple[int, ...], gguf_name: str | None = None) -> None:
        qtype = tensor_type(mix, name, shape[-2:], m)
        float_type = "F32" if len(shape) == 1 or name.endswith("feed_forward.gate.weight") else "F16"
        out.append(Planned(gguf_name or to_gguf_name(name), name, shape, qtype, float_type))

    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    add("tok_embeddings.weight", (args.vocab_size, args.dim))
    for i in range(args.n_layers):
        p = f"layers.{i}."
        add(p + "attention_norm.weight", (args.dim,))
        add(p + "attention.wq.weight", (q, args.dim))
        add(p + "attention.wk.weight", (kv, args.dim))
        add(p + "attention.wv.weight", (kv, args.dim))
        add(p + "attention.wo.weight", (args.dim, q))
        add(p + "ffn_norm.weight", (args.dim,))
        ffn = {"w1": (args.hidden_dim, args.dim), "w2": (args.dim, args.hidden_dim), "w3": (args.hidden_dim, args.dim)}
        if args.moe is None:
            for wn, shape in ffn.items():
                add(f"{p}feed_forward.{wn}.weight", shape)
            continue
        add(p + "feed_forward.gate.weight", (args.moe.num_experts, args.dim))
        for wn in GGUF_EXPERTS:
            add(f"{p}feed_forward.experts.0.{wn}.weight", (args.moe.num_experts, *ffn[wn]), gguf_experts_name(i, wn))
    add("norm.weight", (args.dim,))
    add("output.weight", (args.vocab_size, args.dim))
    return out


def unit_std(qtype: str) -> float:
    """The standard deviation of the weights of random blocks of ``qtype`` whose fp16 fields are standard normal:
    the weights scale with the fields, so ``--std / unit_std`` is the fields' spread that gives ``--std``."""
    import torch

    from sirocco.backends.quant.layouts import dequantize, random_blocks
    blocks = random_blocks(64, 4096, qtype, torch.Generator().manual_seed(0), scale=1.0)
    return float(dequantize(blocks, qtype).std())


def random_tensor(p: Planned, rng: np.random.Generator, field_std: dict[str, float], std: float) -> np.ndarray:
    """The bytes of one tensor: uniform random blocks with normal fp16 fields (quantized), else normal or ones."""
    from sirocco.backends.quant.layouts import layout, packed_shape
    if p.qtype is None:
        if len(p.shape) == 1:
            return np.ones(p.shape, dtype=np.float32)
        dtype = np.float32 if p.float_type == "F32" else np.float16
        return (rng.standard_normal(p.shape, dtype=np.float32) * std).astype(dtype)
    lay = layout(p.qtype)
    shape = packed_shape(p.shape, p.qtype)
    blocks = rng.integers(0, 256, size=math.prod(shape), dtype=np.uint8).reshape(-1, lay.bytes)
    spread = field_std[p.qtype]
    for at in lay.fp16_fields:
        fields = (rng.standard_normal(blocks.shape[0], dtype=np.float32) * spread).astype(np.float16)
        blocks[:, at:at + 2] = fields.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape)


def tokenizer_file(vocab_size: int) -> Path:
    """Mistral's v1 sentencepiece model where the vocabulary holds it, else the bundled sirocco-tiny one."""
    if vocab_size >= MISTRAL_VOCAB:
        import mistral_common
        return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    from sirocco.pretrained import BUNDLED
    return BUNDLED / "sirocco-tiny" / "tokenizer.model"


def write(args, mix: str, out: Path, std: float = 0.02, seed: int = 0, name: str | None = None,
          progress: bool = False) -> dict:
    """Write the GGUF file of ``args`` in ``mix`` to ``out`` (see the module docstring); returns its summary:
    ``tensors`` (count by GGUF type), ``tensor_bytes``, ``file_bytes``, ``largest_tensor_bytes``, ``seconds``."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from sirocco.backends.quant.mixes import MIXES, mix_name
    from sirocco.checkpoint.gguf_read import ARCH
    from sirocco.checkpoint.gguf_write import add_metadata, add_vocabulary
    from sirocco.tokenizer.gguf_vocab import vocab_from_sentencepiece
    t0 = time.perf_counter()
    mix = mix_name(mix)
    planned = plan(args, mix)
    field_std = {t: std / unit_std(t) for t in {p.qtype for p in planned if p.qtype is not None}}
    w = gguf.GGUFWriter(str(out), ARCH)
    add_metadata(w, args, name or out.stem)
    add_vocabulary(w, vocab_from_sentencepiece(str(tokenizer_file(args.vocab_size)), args.vocab_size))
    w.add_file_type(gguf.LlamaFileType[MIXES[mix][1]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    total = largest = 0
    for p in planned:
        kind = Q[p.qtype.upper()] if p.qtype is not None else Q[p.float_type]
        if p.qtype is not None:
            from sirocco.backends.quant.layouts import packed_shape
            byte_shape = packed_shape(p.shape, p.qtype)
            nbytes = math.prod(byte_shape)
            w.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
        else:
            dtype = np.dtype(np.float32 if kind == Q.F32 else np.float16)
            nbytes = math.prod(p.shape) * dtype.itemsize
            w.add_tensor_info(p.gguf_name, p.shape, dtype, nbytes, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        total += nbytes
        largest = max(largest, nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for k, p in enumerate(planned):
        w.write_tensor_data(random_tensor(p, rng, field_std, std))
        if progress and (k % 20 == 19 or k == len(planned) - 1):
            print(f"  {k + 1}/{len(planned)} tensors, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    w.close()
    return {"path": str(out), "mix": mix, "tensors": counts, "tensor_bytes": total, "file_bytes": out.stat().st_size,
            "largest_tensor_bytes": largest, "seconds": round(time.perf_counter() - t0, 1)}


def iter_types(path: Path) -> Iterator[tuple[str, str]]:
    """(GGUF name, GGUF type name) of every tensor of a GGUF file."""
    import gguf
    for t in gguf.GGUFReader(str(path)).tensors:
        yield t.name, t.tensor_type.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a preset shape (the options below override its fields)")
    ap.add_argument("--mix", required=True, help="a mix of sirocco.backends.quant.mixes: q4_K_M, q2_K, ...")
    ap.add_argument("--out", required=True, type=Path, help="the GGUF file to write")
    for flag, field in (("--dim", "dim"), ("--layers", "n_layers"), ("--heads", "n_heads"),
                        ("--kv-heads", "n_kv_heads"), ("--hidden", "hidden_dim"), ("--vocab", "vocab_size"),
                        ("--experts", "experts"), ("--experts-used", "experts_used")):
        ap.add_argument(flag, dest=field, type=int)
    ap.add_argument("--rope-theta", dest="rope_theta", type=float)
    ap.add_argument("--std", type=float, default=0.02, help="the weights' standard deviation (default 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)
    fields = dict(SHAPES[opts.shape]) if opts.shape else {}
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "experts", "experts_used",
                "rope_theta"):
        if getattr(opts, key) is not None:
            fields[key] = getattr(opts, key)
    missing = {"dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"} - set(fields)
    if missing:
        ap.error(f"give --shape or every size: missing {', '.join(sorted(missing))}")
    if bool(fields.get("experts")) != bool(fields.get("experts_used")):
        ap.error("--experts and --experts-used go together")
    try:
        from sirocco.backends.quant.mixes import mix_name
        mix_name(opts.mix)
        args = model_args(**fields)
    except ValueError as e:
        ap.error(str(e))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    summary = write(args, opts.mix, opts.out, std=opts.std, seed=opts.seed, progress=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
