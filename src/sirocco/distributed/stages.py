"""Splitting a model into pipeline stages: contiguous runs of layers, embedding on the first, head on the last.

    stage 0                 stage 1            ...   stage N-1
    tok_embeddings          layers k..m-1            layers ..n-1
    layers 0..k-1                                    norm, output

A stage is an ordinary ``Transformer`` built with ``layers=[...]``, ``embed`` and ``head``: its layer dict is
keyed by global index, so its state dict keys are exactly the checkpoint's, and a consolidated state dict of
the whole model is the union of the stages' state dicts.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import backends
from ..checkpoint import find_layout, load_model
from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..model import Transformer, build_model
from ..model.attention import Prefill
from .launch import DistContext, agree, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model stage ``index`` of ``count`` holds."""

    index: int
    count: int
    layers: tuple[int, ...]

    @property
    def embed(self) -> bool:
        return self.index == 0

    @property
    def head(self) -> bool:
        return self.index == self.count - 1

    def describe(self) -> str:
        parts = (["tok_embeddings"] if self.embed else []) + [f"layers {self.layers[0]}..{self.layers[-1]}"] + \
                (["norm", "output"] if self.head else [])
        return f"stage {self.index}/{self.count}: " + ", ".join(parts)


def split_layers(n_layers: int, n_stages: int, head_cost: float = 0.0) -> list[list[int]]:
    """Contiguous runs of layers that balance the stages' work, where the last stage also runs the output
    head, worth ``head_cost`` layers; among the other stages the first ones take any extra layer.

    >>> split_layers(5, 2), [len(s) for s in split_layers(32, 3)]
    ([[0, 1, 2], [3, 4]], [11, 11, 10])
    >>> [len(s) for s in split_layers(8, 2, head_cost=5.4)]       # a small model with a large vocabulary
    [7, 1]
    """
    if n_stages < 1:
        raise ConfigError(f"the number of pipeline stages must be at least 1, got {n_stages}")
    if n_stages > n_layers:
        raise ConfigError(f"cannot split {n_layers} layers into {n_stages} pipeline stages: each stage needs at "
                          f"least one layer (use at most {n_layers} pipeline ranks)")
    if n_stages == 1:
        return [list(range(n_layers))]
    # Layers of the last stage: the count whose slowest stage is fastest (ties: fewer on the last).
    def slowest(last: int) -> float:
        return max(-(-(n_layers - last) // (n_stages - 1)), last + head_cost)
    last = min(range(1, n_layers - n_stages + 2), key=slowest)
    base, extra = divmod(n_layers - last, n_stages - 1)
    sizes = [base + (1 if s < extra else 0) for s in range(n_stages - 1)] + [last]
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def head_cost(args: ModelArgs) -> float:
    """The output projection's work per token in layers: vocab x dim against a layer's attention and (active)
    feed-forward weights. About 0.6 for Mistral 7B, 0.3 for Mixtral 8x7B (two experts per token)."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.hidden_dim * (args.moe.num_experts_per_tok if args.moe else 1)
    return args.vocab_size * args.dim / (attn + ffn)


def stage_spec(args: ModelArgs, n_stages: int, index: int) -> StageSpec:
    if not 0 <= index < n_stages:
        raise ConfigError(f"stage index {index} outside 0..{n_stages - 1}")
    return StageSpec(index=index, count=n_stages,
                     layers=tuple(split_layers(args.n_layers, n_stages, head_cost(args))[index]))


def empty_stage(args: ModelArgs, spec: StageSpec) -> Transformer:
    """The stage's module on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return Transformer(args, layers=list(spec.layers), embed=spec.embed, head=spec.head)


def stage_from_state_dict(args: ModelArgs, spec: StageSpec, state_dict: dict[str, torch.Tensor],
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Transformer:
    """The stage with its tensors taken from ``state_dict`` (which may hold the whole model: only the stage's
    keys are read). A missing key or a wrong shape fails naming it."""
    model = empty_stage(args, spec)
    mine = {}
    for name, shape in ((k, v.shape) for k, v in model.state_dict().items()):
        if name not in state_dict:
            raise ConfigError(f"{spec.describe()} needs tensor {name!r}, which the state dict lacks")
        t = state_dict[name]
        if t.shape != shape:
            raise ConfigError(f"tensor {name!r} has shape {tuple(t.shape)}, the config says {tuple(shape)}")
        mine[name] = t.detach().to(device=device, dtype=dtype).clone()
    model.load_state_dict(mine, strict=True, assign=True)
    return model


def random_stage(args: ModelArgs, spec: StageSpec, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Transformer:
    """The stage of ``build_model(args, seed=seed)``: the same random weights a single process would have.
    Builds the whole model on the CPU first (random initialisation draws every tensor in order), then keeps
    only the stage's tensors; for tests and demos with small models."""
    full = build_model(args, seed=seed).state_dict()
    return stage_from_state_dict(args, spec, full, dtype=dtype, device=device)


def load_stage(path: str | Path, spec: StageSpec, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", max_seq_len: int | None = None,
               quantize: str | None = None, backend: str | None = "torch",
               prefill: Prefill = "per_sequence") -> Transformer:
    """Read only this stage's tensors from a checkpoint folder (``sirocco.checkpoint.load_model``), each linear
    weight quantized as it is read where ``quantize`` says (int8 / int4), on ``backend``."""
    return load_model(path, dtype=dtype, device=device, max_seq_len=max_seq_len, layers=list(spec.layers),
                      embed=spec.embed, head=spec.head, quantize=quantize, backend=backend, prefill=prefill)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters a module holds (what a stage keeps resident)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- one rank's stage, after the ranks agree on what they load -----------------------------------------------
def checkpoint_fingerprint(path: Path) -> dict[str, str]:
    """What identifies a checkpoint folder cheaply on every rank: each file's size and, for weights, the
    safetensors header (names, shapes, dtypes, offsets) and the first 64 KiB of data."""
    out = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.suffix not in (".safetensors", ".pth", ".bin", ".json", ".model"):
            continue
        with open(f, "rb") as fh:
            head = b""
            if f.suffix == ".safetensors":
                raw = fh.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                head = raw + fh.read(min(n, 100 * 2**20))
            sample = fh.read(64 * 2**10)
        out[f.name] = fingerprint(f.stat().st_size, head.hex(), sample.hex())
    return out


def rank_stage(ctx: DistContext, model: str | Path | ModelArgs, dtype: torch.dtype = torch.float32,
               seed: int = 0, max_seq_len: int | None = None, quantize: str | None = None,
               backend: str | None = "torch", prefill: Prefill = "per_sequence") -> Transformer:
    """This rank's stage of a pipeline of ``ctx.world_size`` stages, on ``ctx.device``.

    Args:
        model: a checkpoint folder (only this stage's tensors are read), or ``ModelArgs`` for the random
            weights of ``build_model(args, seed=seed)`` (tests, demos).
        quantize: int8 / int4: the stage's linear layers quantized (``backends.quant``), while reading a
            checkpoint's tensors.
        backend, prefill: what computes the stage and its pre-fill attention path (``backends.attach``; the
            plain-PyTorch reference by default, as training wants).

    First every rank compares a fingerprint of what it is about to load (config, checkpoint files or seed,
    dtype); a difference, or more ranks than layers, fails on every rank with the same message."""
    if isinstance(model, ModelArgs):
        args = model
        source: dict[str, Any] = {"random_seed": seed}
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{model}: no such checkpoint folder")
        args, source = find_layout(path).read_args(max_seq_len), dict(checkpoint_fingerprint(path))
    agree(ctx, "model to load (config, weights, dtype)", fingerprint(args.to_dict(), source, str(dtype)))
    spec = stage_spec(args, ctx.world_size, ctx.rank)
    log.info("rank %d: %s", ctx.rank, spec.describe())
    if isinstance(model, ModelArgs):
        stage = random_stage(args, spec, seed=seed, dtype=dtype, device=ctx.device)
        backends.attach(stage, backend, quantize=quantize, prefill=prefill)
        return stage
    return load_stage(path, spec, dtype=dtype, device=ctx.device, max_seq_len=max_seq_len, quantize=quantize,
                      backend=backend, prefill=prefill)
