"""Tensor names and layouts of the two published formats, and the one sirocco keeps internally.

sirocco's modules carry the consolidated (Mistral) names, and its attention rotates adjacent pairs as the
consolidated weights expect. A Hugging Face checkpoint differs in two ways, both undone here at the boundary:
its names (``model.layers.3.self_attn.q_proj.weight`` for ``layers.3.attention.wq.weight``) and the row order
of ``wq``/``wk`` inside each head (it rotates the two halves of a head instead of adjacent pairs).
"""

from __future__ import annotations

import re

import torch

# consolidated suffix inside a layer -> Hugging Face suffix inside ``model.layers.{i}.``
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123]\.weight)")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123]\.weight)")
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}

# Tensors some Hugging Face checkpoints carry that hold no weights (recomputed from the config).
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def to_hf_name(name: str) -> str:
    """``layers.0.feed_forward.experts.3.w1.weight`` -> ``model.layers.0.block_sparse_moe.experts.3.w1.weight``."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_KEY.fullmatch(name)
    if m:
        layer, rest = m.groups()
        e = _EXPERT.fullmatch(rest)
        if e:
            return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}"
        if rest in _LAYER:
            return f"model.layers.{layer}.{_LAYER[rest]}"
    raise KeyError(name)


def from_hf_name(name: str) -> str:
    """The inverse of :func:`to_hf_name`; ``KeyError`` for a name sirocco does not know."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _HF_LAYER_KEY.fullmatch(name)
    if m:
        layer, rest = m.groups()
        e = _HF_EXPERT.fullmatch(rest)
        if e:
            return f"layers.{layer}.feed_forward.experts.{e[1]}.{e[2]}"
        if rest in _LAYER_BACK:
            return f"layers.{layer}.{_LAYER_BACK[rest]}"
    raise KeyError(name)


def rope_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads a tensor's rows hold if its rows need the q/k permutation, else None."""
    if name.endswith("attention.wq.weight"):
        return n_heads
    if name.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Consolidated -> Hugging Face row order of a q/k projection ``(n_heads * D, dim)``.

    Within each head, rows come in adjacent pairs (x0, x1), (x2, x3), ... rotated together; Hugging Face
    wants the first members of all pairs, then the second members: for D=4, rows [0, 1, 2, 3] become
    [0, 2, 1, 3]."""
    rows, dim = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def from_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face -> consolidated row order (the exact inverse of :func:`to_hf_rope`): for D=4, rows
    [0, 1, 2, 3] become [0, 2, 1, 3] again (the permutation is its own inverse only for D=4)."""
    rows, dim = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, dim).transpose(1, 2).reshape(rows, dim)
