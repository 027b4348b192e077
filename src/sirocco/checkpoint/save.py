"""Writing a model in either published format: consolidated (``params.json`` + ``consolidated.safetensors``)
or Hugging Face (``config.json`` + ``model.safetensors``, sharded above a size with an index)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelArgs
from ..model import Transformer
from .config_files import args_to_hf_config, args_to_params
from .names import rope_heads, to_hf_name, to_hf_rope

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def save_consolidated(model: Transformer | State, args: ModelArgs, folder: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Write ``params.json`` and ``consolidated.safetensors`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _state(model, dtype)
    save_file(state, str(folder / "consolidated.safetensors"), metadata={"format": "pt"})
    (folder / "params.json").write_text(json.dumps(args_to_params(args), indent=2) + "\n")
    log.info("wrote %s (consolidated format, %d tensors)", folder, len(state))
    return folder


def save_hf(model: Transformer | State, args: ModelArgs, folder: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` each, with ``model.safetensors.index.json``) in Hugging Face's names and q/k layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in _state(model, dtype).items():
        heads = rope_heads(name, args.n_heads, args.n_kv_heads)
        state[to_hf_name(name)] = to_hf_rope(t, heads).contiguous() if heads else t
    config = args_to_hf_config(args)
    config["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info("wrote %s (Hugging Face format, %d tensors in %d file(s))", folder, len(state), len(shards))
    return folder


def _state(model: Transformer | State, dtype: torch.dtype | None) -> State:
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    return {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in state.items()}


def _shards(state: State, max_bytes: int | None) -> list[State]:
    if max_bytes is None:
        return [state]
    shards: list[State] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards
