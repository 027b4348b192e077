"""Model configuration: one dataclass for every Mistral-architecture model, its validation, the facts derived
from it, and named presets. The published config files (``params.json``, ``config.json``) are read and written
in ``sirocco.checkpoint.config_files``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Window = int | None


@dataclass
class MoeArgs:
    """The sparse mixture of experts of Mixtral: each token runs ``num_experts_per_tok`` of ``num_experts``."""

    num_experts: int = 8
    num_experts_per_tok: int = 2


@dataclass
class ModelArgs:
    """Every field of the Mistral/Mixtral architecture.

    Attributes:
        dim: width of the residual stream.
        n_layers: number of transformer blocks.
        head_dim: size of one attention head (usually ``dim // n_heads``, but not always: Mistral NeMo).
        hidden_dim: inner width of the SiLU-gated feed-forward (of each expert, for MoE).
        n_heads: query heads.
        n_kv_heads: key/value heads; ``n_heads // n_kv_heads`` query heads share one (grouped-query attention).
        norm_eps: epsilon of RMSNorm.
        vocab_size: rows of the embedding and of the output projection.
        rope_theta: base of the rotary position frequencies.
        sliding_window: ``None`` (full causal attention), one window W for every layer, or a list with one
            entry (an int or None) per layer. A query at position i sees keys j with ``i - W < j <= i``:
            W keys, counting itself.
        max_seq_len: the longest sequence (prompt + generation) the model is used for; sizes the KV cache of
            layers without a window.
        moe: ``None`` for a dense feed-forward, else the mixture-of-experts settings.
    """

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    sliding_window: int | list[Window] | None = None
    max_seq_len: int = 32768
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoeArgs(**self.moe)
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field that cannot work."""
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if isinstance(self.sliding_window, list) and len(self.sliding_window) != self.n_layers:
            raise ConfigError(f"sliding_window has {len(self.sliding_window)} entries for {self.n_layers} layers")
        for w in self.windows():
            if w is not None and (not isinstance(w, int) or w <= 0):
                raise ConfigError(f"sliding_window entries must be positive integers or None, got {w!r}")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ConfigError(f"moe.num_experts_per_tok must be in 1..{self.moe.num_experts}, "
                              f"got {self.moe.num_experts_per_tok}")

    # -- derived facts -------------------------------------------------------------------------------------
    def windows(self) -> list[Window]:
        """The window of each layer (None: full causal attention)."""
        if isinstance(self.sliding_window, list):
            return list(self.sliding_window)
        return [self.sliding_window] * self.n_layers

    def window_for(self, layer: int) -> Window:
        return self.windows()[layer]

    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.moe is not None:
            ffn = ffn * self.moe.num_experts + self.dim * self.moe.num_experts
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- named presets ------------------------------------------------------------------------------------------
PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0, sliding_window=4096,
                                 max_seq_len=32768),
    "mistral-7b-v0.3": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 norm_eps=1e-5, vocab_size=32768, rope_theta=1e6, sliding_window=None,
                                 max_seq_len=32768),
    "mixtral-8x7b": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                              norm_eps=1e-5, vocab_size=32000, rope_theta=1e6, sliding_window=None,
                              max_seq_len=32768, moe=MoeArgs(8, 2)),
    "mixtral-8x22b": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                               norm_eps=1e-5, vocab_size=32768, rope_theta=1e6, sliding_window=None,
                               max_seq_len=65536, moe=MoeArgs(8, 2)),
    # Tiny shapes for tests and demos: windows shorter than the sequences tests use, so caches roll.
    "tiny": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                      vocab_size=256, rope_theta=10000.0, sliding_window=8, max_seq_len=256),
    "tiny-moe": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                          vocab_size=256, rope_theta=1e6, sliding_window=None, max_seq_len=256, moe=MoeArgs(4, 2)),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """A named preset, with field overrides: ``preset("tiny", vocab_size=1000)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)
