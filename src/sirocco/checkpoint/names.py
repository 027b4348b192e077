"""Tensor names and layouts of the two published formats and GGUF, and the one sirocco keeps internally.

sirocco's modules carry the consolidated (Mistral) names, and its attention rotates adjacent pairs as the
consolidated weights expect. A Hugging Face checkpoint differs in two ways, both undone here at the boundary:
its names (``model.layers.3.self_attn.q_proj.weight`` for ``layers.3.attention.wq.weight``) and the row order
of ``wq``/``wk`` inside each head (it rotates the two halves of a head instead of adjacent pairs).

GGUF (llama.cpp's names, ``GGUF_NAMES``) keeps the consolidated row order: llama.cpp's converter permutes Hugging
Face's rows back to adjacent pairs, so only the names differ. Mixtral's experts are stacked there: row e of
``blk.i.ffn_gate_exps`` is ``layers.i.feed_forward.experts.e.w1`` (older files: one ``blk.i.ffn_gate.e`` each).
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
# (sirocco name, GGUF name); {i} is a layer. Experts: GGUF_EXPERTS, + "_exps" stacked or ".{e}" one per expert.
GGUF_NAMES = [
    ("tok_embeddings.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("output.weight", "output.weight"),
    ("layers.{i}.attention_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.attention.wq.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.feed_forward.w1.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.feed_forward.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
]
GGUF_EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}

_FIELDS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>\d+)", "w": r"(?P<w>w[123])"}

# Tensors some Hugging Face checkpoints carry that hold no weights (recomputed from the config).
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)       # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else _FIELDS[p] for k, p in enumerate(parts)))


_TO_HF = [(_pattern(c), h) for c, h in NAMES]
_FROM_HF = [(_pattern(h), c) for c, h in NAMES]
_TO_GGUF = [(_pattern(c), g) for c, g in GGUF_NAMES]
_FROM_GGUF = [(_pattern(g), c) for c, g in GGUF_NAMES]
_GGUF_STACKED = re.compile(r"blk\.(?P<i>\d+)\.(?P<w>ffn_gate|ffn_down|ffn_up)_exps\.weight")
_GGUF_EXPERT = re.compile(r"blk\.(?P<i>\d+)\.(?P<w>ffn_gate|ffn_down|ffn_up)\.(?P<e>\d+)\.weight")
_W_OF_GGUF = {g: w for w, g in GGUF_EXPERTS.items()}


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


def to_gguf_name(name: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``blk.0.attn_q.weight`` (experts are written stacked, see
    ``gguf_experts_name``); ``KeyError`` for a name without a GGUF equivalent."""
    return _translate(name, _TO_GGUF)


def gguf_experts_name(layer: int | str, w: str) -> str:
    """The stacked GGUF tensor holding every expert's ``w`` (w1, w2 or w3) of a layer: ``blk.0.ffn_gate_exps.weight``
    for layer 0's w1."""
    return f"blk.{layer}.{GGUF_EXPERTS[w]}_exps.weight"


def from_gguf_name(name: str) -> tuple[str, bool] | None:
    """The sirocco name of a GGUF tensor and whether it is a stack of experts (then the name holds ``{e}`` for the
    expert), or None for a name sirocco does not know. ``blk.0.attn_q.weight`` -> (``layers.0.attention.wq.weight``,
    False); ``blk.1.ffn_down_exps.weight`` -> (``layers.1.feed_forward.experts.{e}.w2.weight``, True)."""
    m = _GGUF_STACKED.fullmatch(name)
    if m:
        return f"layers.{m['i']}.feed_forward.experts.{{e}}.{_W_OF_GGUF[m['w']]}.weight", True
    m = _GGUF_EXPERT.fullmatch(name)
    if m:
        return f"layers.{m['i']}.feed_forward.experts.{m['e']}.{_W_OF_GGUF[m['w']]}.weight", False
    try:
        return _translate(name, _FROM_GGUF), False
    except KeyError:
        return None


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
