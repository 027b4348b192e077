"""The two published config files as ``ModelArgs``: Mistral's consolidated ``params.json`` and Hugging Face's
``config.json`` (``MistralForCausalLM`` / ``MixtralForCausalLM``), read and written.

Every value that is inferred rather than read is logged, an unknown key warns, and a missing required field
fails naming it (the traps are listed in the README, "Checkpoints").

    >>> from sirocco.config import preset
    >>> params_to_args(args_to_params(preset("tiny"))) == preset("tiny")
    True
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..config import ModelArgs, MoeArgs, Window
from ..errors import ConfigError

log = logging.getLogger(__name__)


def _read_json(path: str | Path) -> tuple[dict, str]:
    path = Path(path)
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


# -- Mistral's consolidated params.json --------------------------------------------------------------------
def read_params(path: str | Path, max_seq_len: int | None = None) -> ModelArgs:
    """The ``ModelArgs`` of a ``params.json`` file (see ``params_to_args``)."""
    raw, source = _read_json(path)
    return params_to_args(raw, source=source, max_seq_len=max_seq_len)


def params_to_args(raw: dict, source: str = "params.json", max_seq_len: int | None = None) -> ModelArgs:
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
    return ModelArgs(dim=raw["dim"], n_layers=raw["n_layers"], head_dim=int(head_dim), hidden_dim=raw["hidden_dim"],
                     n_heads=raw["n_heads"], n_kv_heads=raw["n_kv_heads"], norm_eps=float(raw["norm_eps"]),
                     vocab_size=raw["vocab_size"], rope_theta=float(theta), sliding_window=window,
                     max_seq_len=max_seq_len, moe=moe)


def args_to_params(args: ModelArgs) -> dict:
    """The dict a consolidated ``params.json`` holds for ``args``."""
    out: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim,
                           "hidden_dim": args.hidden_dim, "n_heads": args.n_heads,
                           "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
                           "vocab_size": args.vocab_size, "rope_theta": args.rope_theta,
                           "max_seq_len": args.max_seq_len}
    if args.sliding_window is not None:
        out["sliding_window"] = args.sliding_window
    if args.moe is not None:
        out["moe"] = dataclasses.asdict(args.moe)
    return out


# -- Hugging Face config.json ------------------------------------------------------------------------------
def read_hf_config(path: str | Path, max_seq_len: int | None = None) -> ModelArgs:
    """The ``ModelArgs`` of a Hugging Face ``config.json`` file (see ``hf_config_to_args``)."""
    raw, source = _read_json(path)
    return hf_config_to_args(raw, source=source, max_seq_len=max_seq_len)


def hf_config_to_args(raw: dict, source: str = "config.json", max_seq_len: int | None = None) -> ModelArgs:
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
    return ModelArgs(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], head_dim=int(head_dim),
                     hidden_dim=raw["intermediate_size"], n_heads=n_heads, n_kv_heads=n_kv, norm_eps=float(eps),
                     vocab_size=raw["vocab_size"], rope_theta=float(theta), sliding_window=window,
                     max_seq_len=max_seq_len, moe=moe)


def args_to_hf_config(args: ModelArgs) -> dict:
    """The dict of a Hugging Face ``config.json`` for ``args`` (without the ``dtype``, which the weights give)."""
    if isinstance(args.sliding_window, list):
        raise ConfigError("sliding_window: a per-layer list has no Hugging Face Mistral equivalent")
    out: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta, "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if args.moe is not None:
        out["num_local_experts"] = args.moe.num_experts
        out["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return out


def _parse_window(value: Any, n_layers: int, source: str) -> int | list[Window] | None:
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
