"""Model configuration: one dataclass for every Mistral-architecture model, named presets, and readers for the
two published config files (Mistral's consolidated ``params.json`` and Hugging Face's ``config.json``).

Every value that is inferred rather than read is logged, an unknown key warns, and a missing required field
fails naming it (the traps are listed in the README, "Checkpoints").
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError

log = logging.getLogger(__name__)

Window = Optional[int]


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
    sliding_window: Union[None, int, list[Window]] = None
    max_seq_len: int = 32768
    moe: Optional[MoeArgs] = None

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
        if self.moe is not None:
            if not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
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

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- Mistral's consolidated params.json ----------------------------------------------------------------
    @classmethod
    def from_params_json(cls, path: Union[str, Path], max_seq_len: Optional[int] = None) -> "ModelArgs":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls.from_params(raw, source=str(path), max_seq_len=max_seq_len)

    @classmethod
    def from_params(cls, raw: dict, source: str = "params.json", max_seq_len: Optional[int] = None) -> "ModelArgs":
        """Build from the dict of a consolidated ``params.json``; apply the rope_theta rule and log it."""
        required = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size")
        for key in required:
            if key not in raw:
                raise ConfigError(f"{source}: missing required field '{key}'")
        known = set(required) | {"head_dim", "rope_theta", "sliding_window", "moe", "max_seq_len", "max_batch_size",
                                 "model_type", "use_biases", "lora", "vision_encoder", "_sliding_window",
                                 "max_position_embeddings"}
        for key in raw:
            if key not in known:
                log.warning("%s: unknown field '%s' ignored", source, key)
        window = _parse_window(raw.get("sliding_window"), raw["n_layers"], source)
        head_dim = raw.get("head_dim")
        if head_dim is None:
            head_dim = raw["dim"] // raw["n_heads"]
            log.info("%s: no head_dim, using dim / n_heads = %d", source, head_dim)
        moe = None
        if raw.get("moe"):
            m = raw["moe"]
            for key in ("num_experts", "num_experts_per_tok"):
                if key not in m:
                    raise ConfigError(f"{source}: missing required field 'moe.{key}'")
            moe = MoeArgs(num_experts=int(m["num_experts"]), num_experts_per_tok=int(m["num_experts_per_tok"]))
        theta = raw.get("rope_theta")
        if theta is None:
            # The rule of the published checkpoints: a windowed model without rope_theta is v0.1 (10000);
            # Mixtral's params have neither and use 1e6.
            theta = 10000.0 if window is not None else 1e6
            log.info("%s: no rope_theta; %s, so rope_theta = %g", source,
                     "sliding_window is set (Mistral 7B v0.1 style)" if window is not None
                     else "no sliding_window (Mixtral style)", theta)
        if max_seq_len is None:
            max_seq_len = int(raw.get("max_seq_len") or raw.get("max_position_embeddings") or 32768)
        return cls(dim=raw["dim"], n_layers=raw["n_layers"], head_dim=int(head_dim), hidden_dim=raw["hidden_dim"],
                   n_heads=raw["n_heads"], n_kv_heads=raw["n_kv_heads"], norm_eps=float(raw["norm_eps"]),
                   vocab_size=raw["vocab_size"], rope_theta=float(theta), sliding_window=window,
                   max_seq_len=max_seq_len, moe=moe)

    def to_params(self) -> dict:
        out: dict[str, Any] = {"dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
                               "hidden_dim": self.hidden_dim, "n_heads": self.n_heads,
                               "n_kv_heads": self.n_kv_heads, "norm_eps": self.norm_eps,
                               "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
                               "max_seq_len": self.max_seq_len}
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        return out

    # -- Hugging Face config.json --------------------------------------------------------------------------
    @classmethod
    def from_hf_config_json(cls, path: Union[str, Path], max_seq_len: Optional[int] = None) -> "ModelArgs":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls.from_hf_config(raw, source=str(path), max_seq_len=max_seq_len)

    @classmethod
    def from_hf_config(cls, raw: dict, source: str = "config.json", max_seq_len: Optional[int] = None) -> "ModelArgs":
        """Build from a ``MistralForCausalLM`` or ``MixtralForCausalLM`` ``config.json``."""
        model_type = raw.get("model_type")
        if model_type not in ("mistral", "mixtral"):
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; sirocco reads 'mistral' and 'mixtral'")
        required = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
        for key in required:
            if key not in raw:
                raise ConfigError(f"{source}: missing required field '{key}'")
        n_heads = raw["num_attention_heads"]
        n_kv = raw.get("num_key_value_heads")
        if n_kv is None:
            n_kv = n_heads
            log.info("%s: no num_key_value_heads, using num_attention_heads = %d", source, n_kv)
        head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
        eps = raw.get("rms_norm_eps")
        if eps is None:
            raise ConfigError(f"{source}: missing required field 'rms_norm_eps' (library defaults differ from "
                              "the checkpoints' 1e-5, so sirocco does not guess)")
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
            rope_type = raw["rope_parameters"].get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported")
        if theta is None:
            theta = 10000.0
            log.info("%s: no rope_theta, using the library default 10000", source)
        window = _parse_window(raw.get("sliding_window"), raw["num_hidden_layers"], source)
        moe = None
        if model_type == "mixtral":
            moe = MoeArgs(num_experts=int(raw.get("num_local_experts", 8)),
                          num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)))
        if raw.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: field 'tie_word_embeddings' is true; Mistral models do not tie them")
        if max_seq_len is None:
            max_seq_len = int(raw.get("max_position_embeddings") or 32768)
        return cls(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], head_dim=int(head_dim),
                   hidden_dim=raw["intermediate_size"], n_heads=n_heads, n_kv_heads=n_kv, norm_eps=float(eps),
                   vocab_size=raw["vocab_size"], rope_theta=float(theta), sliding_window=window,
                   max_seq_len=max_seq_len, moe=moe)

    def to_hf_config(self) -> dict:
        if isinstance(self.sliding_window, list):
            raise ConfigError("sliding_window: a per-layer list has no Hugging Face Mistral equivalent")
        out: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.moe else "MistralForCausalLM"],
            "model_type": "mixtral" if self.moe else "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta, "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2,
        }
        if self.moe is not None:
            out["num_local_experts"] = self.moe.num_experts
            out["num_experts_per_tok"] = self.moe.num_experts_per_tok
        return out


def _parse_window(value: Any, n_layers: int, source: str) -> Union[None, int, list[Window]]:
    """sliding_window as found in the wild: absent/null, an int, a numeric string, or a per-layer list."""
    def one(v: Any) -> Window:
        if v is None:
            return None
        if isinstance(v, str):
            if not v.strip().isdigit():
                raise ConfigError(f"{source}: field 'sliding_window' is {v!r}, not a number")
            log.info("%s: sliding_window given as the string %r, read as %d", source, v, int(v))
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{source}: field 'sliding_window' must be a positive integer, got {v!r}")
        return v

    if isinstance(value, list):
        if len(value) != n_layers:
            raise ConfigError(f"{source}: field 'sliding_window' lists {len(value)} windows for {n_layers} layers")
        windows = [one(v) for v in value]
        return windows[0] if len(set(windows)) == 1 else windows
    return one(value)


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
