"""The model: the transformer (transformer.py, top to bottom), its attention and RoPE."""

from .attention import REFERENCE_OPS, AttentionOps, attend
from .rope import apply_rope, rope_tables
from .transformer import (
                          Attention,
                          FeedForward,
                          MoeFeedForward,
                          RMSNorm,
                          Transformer,
                          TransformerBlock,
                          build_model,
                          init_weights,
)

__all__ = ["REFERENCE_OPS", "Attention", "AttentionOps", "FeedForward", "MoeFeedForward", "RMSNorm", "Transformer",
           "TransformerBlock", "apply_rope", "attend", "build_model", "init_weights", "rope_tables"]
