"""The quantization mixes (backends/quant/mixes.py) against a table read off llama.cpp's rules (src/llama-quant.cpp,
``llama_tensor_get_type`` without an importance matrix): each row names the rule it exercises.

The same rules were checked against ``llama-quantize`` itself (commit 0c1e57098) on random f32 models of the shapes
below (32 layers with 4 and 2 query heads per kv head, 8 experts, and a model whose K is 192 or 416): the types of
all 4170 tensors of the 24 files it wrote agreed with ``tensor_type``.
"""

import pytest

from sirocco.backends.quant.mixes import MIXES, MixModel, mix_name, mix_types, tensor_type, use_more_bits
from sirocco.config import ModelArgs, MoeArgs

MISTRAL_7B = MixModel(n_layers=32, n_heads=32, n_kv_heads=8)                   # 4 query heads per kv head
GQA_2 = MixModel(n_layers=32, n_heads=32, n_kv_heads=16)
MIXTRAL = MixModel(n_layers=32, n_heads=32, n_kv_heads=8, n_experts=8)
FOUR_EXPERTS = MixModel(n_layers=32, n_heads=32, n_kv_heads=8, n_experts=4)
TINY = MixModel(n_layers=6, n_heads=6, n_kv_heads=2)                            # dim 192, hidden 512

# Mistral 7B's shapes: (N, K) = nn.Linear's (out, in)
SHAPE = {"wq": (4096, 4096), "wk": (1024, 4096), "wv": (1024, 4096), "wo": (4096, 4096),
         "w1": (14336, 4096), "w2": (4096, 14336), "w3": (14336, 4096)}
TINY_SHAPE = {"wq": (192, 192), "wk": (64, 192), "wv": (64, 192), "wo": (192, 192),
              "w1": (512, 192), "w2": (192, 512), "w3": (512, 192)}


def w(i: int, name: str, expert: int | None = None) -> str:
    if name in ("wq", "wk", "wv", "wo"):
        return f"layers.{i}.attention.{name}.weight"
    return f"layers.{i}.feed_forward.{'' if expert is None else f'experts.{expert}.'}{name}.weight"


def s(name: str) -> tuple[int, int]:
    return SHAPE[name]


# (mix, model, tensor name, shape, expected type, the rule)
TABLE = [
    # Q4_K_M on Mistral 7B: q4_K, q6_K for the head and in the "more bits" layers of attention-v and ffn-down
    ("Q4_K_M", MISTRAL_7B, w(0, "wq"), s("wq"), "q4_K", "default type"),
    ("Q4_K_M", MISTRAL_7B, w(5, "wk"), s("wk"), "q4_K", "attention-k: no rule for a dense model"),
    ("Q4_K_M", MISTRAL_7B, w(5, "wo"), s("wo"), "q4_K", "attention-output: no rule in Q4_K_M (dense)"),
    ("Q4_K_M", MISTRAL_7B, w(5, "w1"), s("w1"), "q4_K", "ffn-gate: default"),
    ("Q4_K_M", MISTRAL_7B, w(5, "w3"), s("w3"), "q4_K", "ffn-up: default"),
    ("Q4_K_M", MISTRAL_7B, w(0, "wv"), s("wv"), "q6_K", "attention-v, more bits: i < n/8"),
    ("Q4_K_M", MISTRAL_7B, w(3, "wv"), s("wv"), "q6_K", "attention-v, more bits: i < n/8 (last of the first 8th)"),
    ("Q4_K_M", MISTRAL_7B, w(4, "wv"), s("wv"), "q4_K", "attention-v: (i - n/8) % 3 == 0, not more bits"),
    ("Q4_K_M", MISTRAL_7B, w(6, "wv"), s("wv"), "q6_K", "attention-v, more bits: (i - n/8) % 3 == 2"),
    ("Q4_K_M", MISTRAL_7B, w(27, "wv"), s("wv"), "q6_K", "attention-v, more bits: (27 - 4) % 3 == 2"),
    ("Q4_K_M", MISTRAL_7B, w(28, "wv"), s("wv"), "q6_K", "attention-v, more bits: i >= 7n/8"),
    ("Q4_K_M", MISTRAL_7B, w(3, "w2"), s("w2"), "q6_K", "ffn-down, more bits: i < n/8"),
    ("Q4_K_M", MISTRAL_7B, w(26, "w2"), s("w2"), "q4_K", "ffn-down: (26 - 4) % 3 == 1, not more bits"),
    ("Q4_K_M", MISTRAL_7B, w(31, "w2"), s("w2"), "q6_K", "ffn-down, more bits: last layer"),
    ("Q4_K_M", MISTRAL_7B, "output.weight", (32768, 4096), "q6_K", "output head: q6_K"),
    ("Q4_K_M", MISTRAL_7B, "tok_embeddings.weight", (32768, 4096), "q4_K", "token embedding: the default type"),
    ("Q4_K_M", MISTRAL_7B, "norm.weight", (4096,), None, "norms stay float"),
    ("Q4_K_M", MISTRAL_7B, "layers.7.attention_norm.weight", (4096,), None, "norms stay float"),
    ("Q4_K_M", MISTRAL_7B, "layers.7.ffn_norm.weight", (4096,), None, "norms stay float"),
    # Q5_K_M: the same promotions over q5_K
    ("Q5_K_M", MISTRAL_7B, w(9, "wq"), s("wq"), "q5_K", "default type"),
    ("Q5_K_M", MISTRAL_7B, w(0, "wv"), s("wv"), "q6_K", "attention-v, more bits"),
    ("Q5_K_M", MISTRAL_7B, w(4, "wv"), s("wv"), "q5_K", "attention-v, not more bits"),
    ("Q5_K_M", MISTRAL_7B, w(9, "w2"), s("w2"), "q6_K", "ffn-down, more bits: (9 - 4) % 3 == 2"),
    ("Q5_K_M", MISTRAL_7B, w(10, "w2"), s("w2"), "q5_K", "ffn-down, not more bits"),
    ("Q5_K_M", MISTRAL_7B, "output.weight", (32768, 4096), "q6_K", "output head: q6_K"),
    ("Q5_K_M", MISTRAL_7B, "tok_embeddings.weight", (32768, 4096), "q5_K", "token embedding: default"),
    # Q6_K: everything q6_K
    ("Q6_K", MISTRAL_7B, w(0, "wv"), s("wv"), "q6_K", "default; no promotion above q6_K"),
    ("Q6_K", MISTRAL_7B, w(0, "w2"), s("w2"), "q6_K", "default"),
    ("Q6_K", MISTRAL_7B, "output.weight", (32768, 4096), "q6_K", "output head: q6_K"),
    # Q3_K_M: attention-v q5_K in layers 0-1 then q4_K; ffn-down q5_K below n/16 then q4_K; attention-output q4_K
    ("Q3_K_M", MISTRAL_7B, w(5, "wq"), s("wq"), "q3_K", "default type"),
    ("Q3_K_M", MISTRAL_7B, w(5, "w1"), s("w1"), "q3_K", "ffn-gate: default"),
    ("Q3_K_M", MISTRAL_7B, w(1, "wv"), s("wv"), "q5_K", "attention-v: the first two get q5_K"),
    ("Q3_K_M", MISTRAL_7B, w(2, "wv"), s("wv"), "q4_K", "attention-v: the rest q4_K"),
    ("Q3_K_M", MISTRAL_7B, w(1, "w2"), s("w2"), "q5_K", "ffn-down: i < n/16"),
    ("Q3_K_M", MISTRAL_7B, w(2, "w2"), s("w2"), "q4_K", "ffn-down: i >= n/16 (llama arch: q4_K)"),
    ("Q3_K_M", MISTRAL_7B, w(2, "wo"), s("wo"), "q4_K", "attention-output: q4_K"),
    ("Q3_K_M", MISTRAL_7B, "output.weight", (32768, 4096), "q6_K", "output head: q6_K"),
    # Q2_K
    ("Q2_K", MISTRAL_7B, w(5, "wq"), s("wq"), "q2_K", "default type"),
    ("Q2_K", MISTRAL_7B, w(5, "wk"), s("wk"), "q2_K", "attention-k: default"),
    ("Q2_K", MISTRAL_7B, w(5, "wv"), s("wv"), "q4_K", "attention-v: 4 query heads per kv head -> q4_K"),
    ("Q2_K", GQA_2, w(5, "wv"), s("wv"), "q3_K", "attention-v: fewer than 4 per kv head -> q3_K"),
    ("Q2_K", MISTRAL_7B, w(5, "w2"), s("w2"), "q3_K", "ffn-down: q3_K"),
    ("Q2_K", MISTRAL_7B, w(5, "wo"), s("wo"), "q3_K", "attention-output: q3_K (dense)"),
    ("Q2_K", MISTRAL_7B, "tok_embeddings.weight", (32768, 4096), "q2_K", "token embedding: default"),
    # IQ4_XS
    ("IQ4_XS", MISTRAL_7B, w(5, "wq"), s("wq"), "iq4_xs", "default type"),
    ("IQ4_XS", MISTRAL_7B, w(5, "wv"), s("wv"), "q5_K", "attention-v: 4 query heads per kv head -> q5_K"),
    ("IQ4_XS", GQA_2, w(5, "wv"), s("wv"), "iq4_xs", "attention-v: fewer per kv head, default"),
    ("IQ4_XS", MISTRAL_7B, w(3, "w2"), s("w2"), "q5_K", "ffn-down: i < n/8 -> q5_K"),
    ("IQ4_XS", MISTRAL_7B, w(4, "w2"), s("w2"), "iq4_xs", "ffn-down: after the first 8th, default"),
    ("IQ4_XS", MISTRAL_7B, "output.weight", (32768, 4096), "q6_K", "output head: q6_K"),
    ("IQ4_XS", MISTRAL_7B, "tok_embeddings.weight", (32768, 4096), "iq4_xs", "token embedding: default"),
    # Mixtral: exactly 8 experts -> attention-v/k q8_0 in every mix, attention-output q5_K in the lower mixes
    ("Q4_K_M", MIXTRAL, w(4, "wv"), s("wv"), "q8_0", "8 experts: attention-v q8_0"),
    ("Q4_K_M", MIXTRAL, w(4, "wk"), s("wk"), "q8_0", "8 experts: attention-k q8_0"),
    ("Q6_K", MIXTRAL, w(0, "wv"), s("wv"), "q8_0", "8 experts: attention-v q8_0 even in Q6_K"),
    ("Q2_K", MIXTRAL, w(0, "wk"), s("wk"), "q8_0", "8 experts: attention-k q8_0"),
    ("Q4_K_M", MIXTRAL, w(4, "wo"), s("wo"), "q5_K", "8 experts: attention-output q5_K in Q4_K_M"),
    ("Q2_K", MIXTRAL, w(4, "wo"), s("wo"), "q5_K", "8 experts: attention-output q5_K in Q2_K"),
    ("Q3_K_M", MIXTRAL, w(4, "wo"), s("wo"), "q5_K", "8 experts: attention-output q5_K in Q3_K_M"),
    ("IQ4_XS", MIXTRAL, w(4, "wo"), s("wo"), "q5_K", "8 experts: attention-output q5_K in IQ4_XS"),
    ("Q5_K_M", MIXTRAL, w(4, "wo"), s("wo"), "q5_K", "8 experts: Q5_K_M not listed, its default q5_K"),
    ("Q6_K", MIXTRAL, w(4, "wo"), s("wo"), "q6_K", "8 experts: Q6_K not listed, default"),
    ("Q4_K_M", MIXTRAL, w(0, "w2", 3), s("w2"), "q6_K", "expert ffn-down, more bits, by its layer"),
    ("Q4_K_M", MIXTRAL, w(4, "w2", 7), s("w2"), "q4_K", "expert ffn-down, not more bits"),
    ("Q4_K_M", MIXTRAL, w(4, "w1", 0), s("w1"), "q4_K", "expert ffn-gate: default"),
    ("Q2_K", MIXTRAL, w(4, "w2", 1), s("w2"), "q3_K", "expert ffn-down in Q2_K: q3_K"),
    ("Q3_K_M", MIXTRAL, w(1, "w2", 1), s("w2"), "q5_K", "expert ffn-down in Q3_K_M, i < n/16"),
    ("Q4_K_M", MIXTRAL, "layers.4.feed_forward.gate.weight", (8, 4096), None, "router stays float"),
    ("Q4_K_M", FOUR_EXPERTS, w(4, "wv"), s("wv"), "q4_K", "4 experts: the 8-expert rules do not apply"),
    ("Q4_K_M", FOUR_EXPERTS, w(0, "wv"), s("wv"), "q6_K", "4 experts: the dense rules apply"),
    # K not a multiple of 256 (a model of dim 192): each type falls back per tensor
    ("Q4_K_M", TINY, w(0, "wq"), TINY_SHAPE["wq"], "q5_0", "fallback q4_K -> q5_0"),
    ("Q4_K_M", TINY, w(0, "w2"), TINY_SHAPE["w2"], "q4_K", "K = 512 fits; use_more_bits(0, 6) is false"),
    ("Q4_K_M", TINY, w(2, "w2"), TINY_SHAPE["w2"], "q6_K", "K = 512 fits; (2 - 0) % 3 == 2: more bits"),
    ("Q4_K_M", TINY, w(5, "wv"), TINY_SHAPE["wv"], "q8_0", "more bits q6_K, fallback q6_K -> q8_0"),
    ("Q4_K_M", TINY, "output.weight", (4096, 192), "q8_0", "output head: K not a multiple of q4_K's 256 -> q8_0"),
    ("Q4_K_M", TINY, "tok_embeddings.weight", (4096, 192), "q5_0", "token embedding: fallback q4_K -> q5_0"),
    ("Q5_K_M", TINY, w(0, "wq"), TINY_SHAPE["wq"], "q5_1", "fallback q5_K -> q5_1"),
    ("Q6_K", TINY, w(0, "wq"), TINY_SHAPE["wq"], "q8_0", "fallback q6_K -> q8_0"),
    ("Q3_K_M", TINY, w(0, "wq"), TINY_SHAPE["wq"], "q4_0", "fallback q3_K -> q4_0"),
    ("Q2_K", TINY, w(0, "wq"), TINY_SHAPE["wq"], "q4_0", "fallback q2_K -> q4_0"),
    ("Q2_K", TINY, w(0, "wv"), TINY_SHAPE["wv"], "q4_0", "3 query heads per kv head: q3_K, fallback q4_0"),
    ("Q2_K", TINY, w(0, "w2"), TINY_SHAPE["w2"], "q3_K", "ffn-down q3_K, K = 512 fits"),
    ("IQ4_XS", TINY, w(0, "wq"), TINY_SHAPE["wq"], "iq4_nl", "fallback iq4_xs -> iq4_nl"),
    ("Q4_K_M", TINY, w(0, "w2"), (192, 100), None, "K not a multiple of 32: float (llama.cpp writes F16)"),
    # sirocco's earlier formats, as they were
    ("Q8_0", MISTRAL_7B, w(0, "wv"), s("wv"), "q8_0", "sirocco q8_0: every linear weight"),
    ("Q8_0", MISTRAL_7B, "output.weight", (32768, 4096), "q8_0", "sirocco: head q8_0"),
    ("Q8_0", MISTRAL_7B, "tok_embeddings.weight", (32768, 4096), None, "sirocco: embedding in float"),
    ("Q4_0", MISTRAL_7B, w(0, "w2"), s("w2"), "q4_0", "sirocco q4_0: no promotion"),
    ("Q4_0", MIXTRAL, w(0, "wv"), s("wv"), "q4_0", "sirocco q4_0: no 8-expert rule"),
    ("Q4_0", MISTRAL_7B, "output.weight", (32768, 4096), "q8_0", "sirocco: head q8_0"),
    ("Q4_0", TINY, w(0, "w2"), (192, 100), None, "sirocco: K not a multiple of 32 stays float"),
]


@pytest.mark.parametrize("mix, model, name, shape, expected, rule", TABLE, ids=[f"{r[0]}-{r[2]}-{r[5]}" for r in TABLE])
def test_tensor_type_follows_llama_cpp_rules(mix, model, name, shape, expected, rule):
    assert tensor_type(mix, name, shape, model) == expected, rule


def test_more_bits_layers_of_mistral_7b():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]


def test_a_whole_model_and_the_names_people_type():
    args = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                     norm_eps=1e-5, vocab_size=32768, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2))
    model = MixModel.of(args)
    assert model == MIXTRAL and model.n_gqa == 4
    types = mix_types("q4_k_m", {w(0, "wv"): s("wv"), "norm.weight": (4096,)}, model)
    assert types == {w(0, "wv"): "q8_0", "norm.weight": None}
    assert mix_name("iq4_xs") == "IQ4_XS" and set(MIXES) >= {"Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS"}
    with pytest.raises(ValueError, match="unknown quantization mix 'Q4_K_X'"):
        tensor_type("Q4_K_X", w(0, "wq"), s("wq"), MISTRAL_7B)
    with pytest.raises(ValueError, match="not a weight of a Mistral or Mixtral model"):
        tensor_type("Q4_K_M", "layers.0.attention.wz.weight", (4, 4), MISTRAL_7B)
    with pytest.raises(ValueError, match="layer 32 of a model of 32 layers"):
        tensor_type("Q4_K_M", w(32, "wq"), s("wq"), MISTRAL_7B)
