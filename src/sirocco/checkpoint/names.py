"""Tensor names and layouts of the two published formats, and the one sirocco keeps internally.

sirocco's modules carry the consolidated (Mistral) names, and its attention rotates adjacent pairs as the
consolidated weights expect. A Hugging Face checkpoint differs in two ways, both undone here at the boundary:
its names (``model.layers.3.self_attn.q_proj.weight`` for ``layers.3.attention.wq.weight``) and the row order
of ``wq``/``wk`` inside each head (it rotates the two halves of a head instead of adjacent pairs).
"""

from __future__ import annotations

import re

import torch

# (consolidated name, Hugging Face name); {i} is a layer, {e} an expert, {w} one of w1/w2/w3.
NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
    ("layers.{i}.feed_forward.experts.{e}.{w}.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"),
]
_FIELDS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>\d+)", "w": r"(?P<w>w[123])"}

# Tensors some Hugging Face checkpoints carry that hold no weights (recomputed from the config).
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)       # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else _FIELDS[p] for k, p in enumerate(parts)))


_TO_HF = [(_pattern(c), h) for c, h in NAMES]
_FROM_HF = [(_pattern(h), c) for c, h in NAMES]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    raise KeyError(name)


def to_hf_name(name: str) -> str:
    """``layers.0.feed_forward.experts.3.w1.weight`` -> ``model.layers.0.block_sparse_moe.experts.3.w1.weight``."""
    return _translate(name, _TO_HF)


def from_hf_name(name: str) -> str:
    """The inverse of :func:`to_hf_name`; ``KeyError`` for a name sirocco does not know."""
    return _translate(name, _FROM_HF)


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
