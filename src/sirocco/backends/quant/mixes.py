"""Which block type each tensor of a Mistral or Mixtral model gets in a quantization mix, by llama.cpp's rules.

A mix (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``, ``Q3_K_M``, ``Q2_K``, ``IQ4_XS``) names a default type for the weight
matrices and the promotions llama.cpp's ``llama-quantize`` makes (``llama_tensor_get_type``, without an importance
matrix), so that a file sirocco writes holds the types a file of the same name from llama.cpp holds:

- the output head: ``q6_K`` (``q8_0`` where its K is not a multiple of the default type's block);
- the token embedding: the default type (quantizing at load, sirocco keeps the table in float, rounded through
  the type; a GGUF file's table stays in its blocks, ``QuantEmbedding``; the file stores it as llama.cpp does, a
  quarter of its f16 size in Q4_K_M);
- attention-v: Q4_K_M and Q5_K_M give ``q6_K`` in the "more bits" layers (``use_more_bits``: the first and last
  eighth, and every third layer between); Q3_K_M ``q5_K`` in layers 0 and 1, ``q4_K`` after; Q2_K ``q4_K`` where
  4 or more query heads share a kv head (``n_heads // n_kv_heads >= 4``, Mistral 7B's 32/8), else ``q3_K``;
  IQ4_XS ``q5_K`` under the same grouping;
- feed-forward-down (every expert's): Q4_K_M and Q5_K_M ``q6_K`` in the "more bits" layers; Q3_K_M ``q5_K`` in
  the first sixteenth of the layers, ``q4_K`` after; Q2_K ``q3_K``; IQ4_XS ``q5_K`` in the first eighth;
- attention-output: Q3_K_M ``q4_K``, Q2_K ``q3_K``;
- a model of exactly 8 experts (Mixtral): attention-v and attention-k ``q8_0`` in every mix, attention-output
  ``q5_K`` in Q2_K, Q3_K_M, Q4_K_M and IQ4_XS;
- kept in float: the norms and the MoE router (llama.cpp leaves both as they are; ``None`` here);
- a K that is not a multiple of the chosen type's block falls back per tensor (``FALLBACK``): ``q2_K`` and
  ``q3_K`` to ``q4_0``, ``q4_K`` to ``q5_0``, ``q5_K`` to ``q5_1``, ``q6_K`` to ``q8_0``, ``iq4_xs`` to
  ``iq4_nl``; and where even 32 does not divide K, float (llama.cpp writes F16 there; ``None`` here).

``Q8_0`` and ``Q4_0`` are sirocco's two earlier formats as they were (``--quantize int8/int4``): every attention
and feed-forward weight in the format, the output head ``q8_0``, the embedding and router in float. llama.cpp's
own Q4_0 would also give the head ``q6_K``, the embedding ``q4_0`` and Mixtral's attention-v/k ``q8_0``.

Worked example (Mistral 7B: 32 layers, 32 heads over 8 kv heads; Q4_K_M): ``use_more_bits(i, 32)`` holds for
i < 4, i >= 28 and i = 6, 9, ..., 27 ((i - 4) % 3 == 2), so attention-v and feed-forward-down are ``q6_K`` in
layers 0-3, 6, 9, 12, 15, 18, 21, 24, 27-31 and ``q4_K`` in the other 16.

>>> m = MixModel(n_layers=32, n_heads=32, n_kv_heads=8)
>>> [tensor_type("Q4_K_M", f"layers.{i}.attention.wv.weight", (1024, 4096), m) for i in (3, 4, 6)]
['q6_K', 'q4_K', 'q6_K']
>>> tensor_type("q4_k_m", "output.weight", (32768, 4096), m), tensor_type("Q2_K", "norm.weight", (4096,), m)
('q6_K', None)
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sirocco.backends.quant.quantizers import TYPES
from sirocco.config import ModelArgs

# mix -> its default type (ggml's spelling) and the GGUF general.file_type (gguf.LlamaFileType's name)
MIXES: dict[str, tuple[str, str]] = {
    "Q4_K_M": ("q4_K", "MOSTLY_Q4_K_M"),
    "Q5_K_M": ("q5_K", "MOSTLY_Q5_K_M"),
    "Q6_K": ("q6_K", "MOSTLY_Q6_K"),
    "Q3_K_M": ("q3_K", "MOSTLY_Q3_K_M"),
    "Q2_K": ("q2_K", "MOSTLY_Q2_K"),
    "IQ4_XS": ("iq4_xs", "MOSTLY_IQ4_XS"),
    "Q8_0": ("q8_0", "MOSTLY_Q8_0"),
    "Q4_0": ("q4_0", "MOSTLY_Q4_0"),
}
SIROCCO_MIXES = ("Q8_0", "Q4_0")                # sirocco's earlier rule (see the module docstring)
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0", "iq4_xs": "iq4_nl"}

_LAYER = re.compile(r"layers\.(\d+)\.")
# sirocco's weight names -> llama.cpp's tensor categories (experts' weights as their layer's)
_CATEGORY = [
    (re.compile(r"layers\.\d+\.attention\.wq\.weight"), "attn_q"),
    (re.compile(r"layers\.\d+\.attention\.wk\.weight"), "attn_k"),
    (re.compile(r"layers\.\d+\.attention\.wv\.weight"), "attn_v"),
    (re.compile(r"layers\.\d+\.attention\.wo\.weight"), "attn_output"),
    (re.compile(r"layers\.\d+\.feed_forward\.(experts\.\d+\.)?w1\.weight"), "ffn_gate"),
    (re.compile(r"layers\.\d+\.feed_forward\.(experts\.\d+\.)?w2\.weight"), "ffn_down"),
    (re.compile(r"layers\.\d+\.feed_forward\.(experts\.\d+\.)?w3\.weight"), "ffn_up"),
    (re.compile(r"tok_embeddings\.weight"), "token_embd"),
    (re.compile(r"output\.weight"), "output"),
]
_FLOAT = re.compile(r"(.*norm\.weight|layers\.\d+\.feed_forward\.gate\.weight)")


@dataclass(frozen=True)
class MixModel:
    """What the rules look at besides a tensor's name and shape: the layer count, the query heads per kv head
    (``n_heads // n_kv_heads``) and the number of experts (0 for a dense model)."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_experts: int = 0

    @classmethod
    def of(cls, args: ModelArgs) -> MixModel:
        return cls(args.n_layers, args.n_heads, args.n_kv_heads, args.moe.num_experts if args.moe else 0)

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads


def mix_name(name: str) -> str:
    """A mix's canonical name from any case: ``q4_k_m`` -> ``Q4_K_M``."""
    key = name.upper()
    if key not in MIXES:
        raise ValueError(f"unknown quantization mix {name!r}; choose one of {', '.join(MIXES)}")
    return key


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's "more bits" layers: the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str | None:
    for pattern, category in _CATEGORY:
        if pattern.fullmatch(name):
            return category
    return None


def _promoted(mix: str, category: str, i: int, m: MixModel) -> str | None:
    """The type llama.cpp's rules choose over the default for a weight of ``category`` in layer ``i`` (None: the
    default stands)."""
    moe8 = m.n_experts == 8
    n = m.n_layers
    if category == "attn_v":
        promoted = None
        if mix == "Q2_K":
            promoted = "q4_K" if m.n_gqa >= 4 else "q3_K"
        elif mix == "Q3_K_M":
            promoted = "q5_K" if i < 2 else "q4_K"
        elif mix == "IQ4_XS" and m.n_gqa >= 4:
            promoted = "q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            promoted = "q6_K"
        return "q8_0" if moe8 else promoted
    if category == "attn_k":
        return "q8_0" if moe8 else None
    if category == "ffn_down":
        if mix == "Q2_K":
            return "q3_K"
        if mix == "Q3_K_M":
            return "q5_K" if i < n // 16 else "q4_K"
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return "q6_K"
        if mix == "IQ4_XS" and i < n // 8:
            return "q5_K"
        return None
    if category == "attn_output":
        if moe8:
            return "q5_K" if mix in ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_XS") else None
        return {"Q2_K": "q3_K", "Q3_K_M": "q4_K"}.get(mix)
    return None


def _fits(qtype: str | None, k: int) -> str | None:
    """``qtype``, or its fallback where K is not a multiple of its block (None: float)."""
    if qtype is None or k % TYPES[qtype][0] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if k % TYPES[qtype][0] == 0 else None


def tensor_type(mix: str, name: str, shape: Sequence[int], model: MixModel) -> str | None:
    """The block type (ggml's spelling, a key of ``quantizers.TYPES``) of sirocco's tensor ``name`` of ``shape``
    ((N, K): nn.Linear's (out, in); an embedding (vocab, dim)) in ``mix`` (any case); None where it stays in
    float. Raises ValueError for an unknown mix or a name that is not a Mistral/Mixtral weight."""
    mix = mix_name(mix)
    default = MIXES[mix][0]
    if len(shape) < 2 or _FLOAT.fullmatch(name):
        return None
    category = _category(name)
    if category is None:
        raise ValueError(f"{name}: not a weight of a Mistral or Mixtral model (shape {tuple(shape)})")
    k = int(shape[-1])
    if mix in SIROCCO_MIXES:
        if category == "token_embd":
            return None
        return _fits("q8_0" if category == "output" else default, k)
    if category == "output":
        return _fits("q8_0" if k % TYPES[default][0] else "q6_K", k)
    if category == "token_embd":
        return _fits(default, k)
    match = _LAYER.match(name)
    assert match is not None, name
    i = int(match.group(1))
    if not 0 <= i < model.n_layers:
        raise ValueError(f"{name}: layer {i} of a model of {model.n_layers} layers")
    return _fits(_promoted(mix, category, i, model) or default, k)


def mix_types(mix: str, shapes: dict[str, Sequence[int]], model: MixModel) -> dict[str, str | None]:
    """``tensor_type`` of every tensor of a state dict's shapes (name -> shape)."""
    return {name: tensor_type(mix, name, shape, model) for name, shape in shapes.items()}
