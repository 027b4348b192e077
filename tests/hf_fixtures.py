"""Tiny random Mistral and Mixtral checkpoints written by ``transformers``' own ``save_pretrained`` (the real
Hugging Face file format), and their logits, for comparisons against sirocco on the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

SHAPES = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)


def hf_model(kind: str, window: int | None = 6, seed: int = 0, **overrides):
    """A random ``MistralForCausalLM`` or ``MixtralForCausalLM`` (4 experts, top 2) in fp32, eval mode."""
    torch.manual_seed(seed)
    shapes = {**SHAPES, **overrides}
    if kind == "mistral":
        config = transformers.MistralConfig(sliding_window=window, rope_theta=10000.0, **shapes)
        model = transformers.MistralForCausalLM(config)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(sliding_window=window, rope_theta=1e6, num_local_experts=4,
                                            num_experts_per_tok=2, **shapes)
        model = transformers.MixtralForCausalLM(config)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    return model.eval()


def save_hf_checkpoint(kind: str, folder: Path, window: int | None = 6, seed: int = 0, **save_kwargs):
    model = hf_model(kind, window, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """(T, vocab) logits of one sequence."""
    with torch.no_grad():
        return model(tokens[None]).logits[0]
