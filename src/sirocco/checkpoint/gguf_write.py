"""Writing a model as a GGUF file llama.cpp loads (``save_gguf``): its metadata in llama.cpp's keys, the vocabulary
of a sentencepiece ``tokenizer.model``, and the tensors the model holds in llama.cpp's names (names.py).

``QuantLinear`` blocks are written byte for byte in their type (``QuantLinear.file_blocks``: Q8_0, Q4_K, IQ4_XS,
...); norms and the MoE router as F32 (as llama.cpp's converter and quantize leave them); the token embedding as
the blocks given for it (``embedding=``: llama.cpp's mixes store it quantized, and sirocco's conversion pass
hands out the blocks it rounded the table through) or else in the float dtype asked, as are linear layers kept
in float. A MoE layer's experts are written stacked (``blk.i.ffn_gate_exps``, (E, N, K)). ``general.file_type``
is the mix's (``MOSTLY_Q4_K_M`` for ``Q4_K_M``).

This module imports the ``gguf`` package (its writer) at the top; ``checkpoint/__init__`` does not import this
module, because the package is slow to import and only writing needs it (``sirocco quantize``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn
from tqdm import tqdm

from ..backends.quant.formats import QuantizedTensor
from ..backends.quant.linear import QuantLinear
from ..backends.quant.mixes import MIXES, mix_name
from ..config import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from ..tokenizer.gguf_vocab import GGUFVocab, vocab_from_sentencepiece
from .gguf_read import ARCH, QUANT_FORMATS
from .names import GGUF_EXPERTS, gguf_experts_name, to_gguf_name

log = logging.getLogger(__name__)

FLOAT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
FLOAT_FILE_TYPES = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                    torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}


def save_gguf(model: Transformer, path: str | Path, tokenizer_model: str | Path, float_dtype: torch.dtype =
              torch.float16, name: Optional[str] = None, progress: Optional[bool] = None, mix: Optional[str] = None,
              embedding: Optional[QuantizedTensor] = None) -> dict:
    """Write ``model`` (a whole model, not a pipeline stage) as a GGUF file (see the module docstring): ``mix``
    (``Q4_K_M``, any case) names its ``general.file_type`` (default: the mix whose default type the first layer's
    wq holds, else the float dtype), ``embedding`` the token embedding's blocks (default: the table in
    ``float_dtype``). Returns a summary: ``tensors`` (count by GGUF type), ``tensor_bytes``, ``file_bytes``."""
    if model.tok_embeddings is None or model.output is None or len(model.layers) != model.args.n_layers:
        raise CheckpointError("save_gguf writes whole models, not pipeline stages")
    if embedding is not None and embedding.shape != tuple(model.tok_embeddings.weight.shape):
        raise CheckpointError(f"embedding blocks of shape {list(embedding.shape)} for a table of shape "
                              f"{list(model.tok_embeddings.weight.shape)}")
    if isinstance(model.args.sliding_window, list):
        raise CheckpointError("sliding_window: a per-layer list of windows has no GGUF 'llama' equivalent")
    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    add_metadata(w, model.args, name or path.stem)
    add_vocabulary(w, vocab_from_sentencepiece(str(tokenizer_model), model.args.vocab_size))
    counts, total = add_tensors(w, model, float_dtype, progress, embedding)
    w.add_file_type(file_type(model, float_dtype, mix))
    if any(kind in QUANT_FORMATS for kind in counts):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=bool(progress))
    w.close()
    size = path.stat().st_size
    log.info("wrote %s (GGUF, %d tensors: %s; %.1f MiB)", path, sum(counts.values()),
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), size / 2**20)
    return {"tensors": counts, "tensor_bytes": total, "file_bytes": size}


def add_metadata(w: gguf.GGUFWriter, args: ModelArgs, name: str) -> None:
    """The model's config in llama.cpp's ``llama.*`` keys."""
    w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_key_length(args.head_dim)             # llama.cpp's converter writes both always
    w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window is not None:
        assert not isinstance(args.sliding_window, list)
        w.add_sliding_window(args.sliding_window)
    if args.moe is not None:
        w.add_expert_count(args.moe.num_experts)
        w.add_expert_used_count(args.moe.num_experts_per_tok)


def add_vocabulary(w: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """A sentencepiece vocabulary as GGUF's ``tokenizer.ggml.*`` keys (tokenizer model "llama")."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")              # what llama.cpp's converter writes for sentencepiece vocabularies
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)


def add_tensors(w: gguf.GGUFWriter, model: Transformer, float_dtype: torch.dtype, progress: Optional[bool],
                embedding: Optional[QuantizedTensor] = None) -> tuple[dict[str, int], int]:
    """Every tensor of ``model`` in llama.cpp's names and order (the embedding as ``embedding``'s blocks where
    given); returns the count by GGUF type and the bytes."""
    counts: dict[str, int] = {}
    total = 0

    def add(gguf_name: str, array: np.ndarray, kind: Q) -> None:
        nonlocal total
        w.add_tensor(gguf_name, array, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        total += array.nbytes

    def norm(weight: torch.Tensor) -> tuple[np.ndarray, Q]:
        return float_array(weight, torch.float32)

    assert model.tok_embeddings is not None and model.norm is not None and model.output is not None
    if embedding is not None:
        add("token_embd.weight", embedding.data.detach().cpu().contiguous().numpy(), Q[embedding.fmt.upper()])
    else:
        add("token_embd.weight", *float_array(model.tok_embeddings.weight, float_dtype))
    for i, layer in tqdm(list(model.layers.items()), desc="writing layers", unit="layer", leave=False,
                         disable=None if progress is None else not progress):
        p = f"layers.{i}."
        add(to_gguf_name(p + "attention_norm.weight"), *norm(layer.attention_norm.weight))
        for wn in ("wq", "wk", "wv", "wo"):
            add(to_gguf_name(f"{p}attention.{wn}.weight"), *linear_array(getattr(layer.attention, wn), float_dtype))
        add(to_gguf_name(p + "ffn_norm.weight"), *norm(layer.ffn_norm.weight))
        ff = layer.feed_forward
        if model.args.moe is None:
            for wn in ("w1", "w2", "w3"):
                add(to_gguf_name(f"{p}feed_forward.{wn}.weight"), *linear_array(getattr(ff, wn), float_dtype))
            continue
        add(to_gguf_name(p + "feed_forward.gate.weight"), *norm(ff.gate.weight))
        for wn in GGUF_EXPERTS:
            parts = [linear_array(getattr(expert, wn), float_dtype) for expert in ff.experts]
            kinds = {k for _, k in parts}
            if len(kinds) != 1:
                raise CheckpointError(f"layer {i}: experts' {wn} are stored in different types {kinds}")
            add(gguf_experts_name(i, wn), np.stack([a for a, _ in parts]), kinds.pop())
    add("output_norm.weight", *norm(model.norm.weight))
    add("output.weight", *linear_array(model.output, float_dtype))
    return counts, total


def float_array(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Q]:
    """A float tensor as the numpy array GGUFWriter takes, in ``dtype`` (bf16 as its raw bytes), and its type."""
    t = t.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.uint8).numpy(), Q.BF16
    return t.numpy(), FLOAT_TYPES[dtype]


def linear_array(module: nn.Module, float_dtype: torch.dtype) -> tuple[np.ndarray, Q]:
    """A linear layer's weight: a ``QuantLinear``'s blocks in the file's layout (``file_blocks``), a float one in
    ``float_dtype``."""
    if isinstance(module, QuantLinear):
        return module.file_blocks().detach().cpu().contiguous().numpy(), Q[module.fmt.upper()]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CheckpointError(f"not a linear layer: {type(module).__name__}")
    return float_array(weight, float_dtype)


def file_type(model: Transformer, float_dtype: torch.dtype, mix: Optional[str] = None) -> gguf.LlamaFileType:
    """``general.file_type``: the mix's; without one, the mix whose default type the first layer's wq holds
    (q4_K: MOSTLY_Q4_K_M), a file of that one type (q5_0: MOSTLY_Q5_0), else the float dtype."""
    if mix is not None:
        return gguf.LlamaFileType[MIXES[mix_name(mix)][1]]
    wq = model.layers[next(iter(model.layers))].attention.wq  # type: ignore[union-attr]
    if not isinstance(wq, QuantLinear):
        return FLOAT_FILE_TYPES[float_dtype]
    by_default = {default: kind for default, kind in reversed(MIXES.values())}
    return gguf.LlamaFileType[by_default.get(wq.fmt, f"MOSTLY_{wq.fmt.upper()}")]
