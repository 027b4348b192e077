"""The Mistral / Mixtral transformer, in one file.

    tokens (T,) -> embedding -> n_layers x [ x + attention(norm(x)) ; x + feed_forward(norm(x)) ] -> norm -> output

Sequences are packed: ``tokens`` holds several sequences back to back, and a ``BatchPlan`` (plan.py) says
where each begins, its positions, and what attention may see (block-diagonal, causal, windowed; with or without
the rolling cache of cache.py). There is no batch dimension and no padding. How attention, RoPE and the linear
layers are computed is the backend's business (backends/): this file is the reference definition in plain
PyTorch, and a backend's conversion pass swaps modules or attention ops, never the model's code.

Internal weight layout = Mistral's consolidated checkpoints (names and the interleaved-pair RoPE layout);
checkpoint/ converts Hugging Face weights at the boundary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import RollingCache
from ..config import ModelArgs
from ..plan import BatchPlan
from .attention import REFERENCE_OPS, AttentionOps, attend
from .rope import rope_tables


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the model's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query attention with an optional sliding window; K/V are never copied to all heads. ``ops`` computes
    RoPE and the attention itself (the reference ops by default; a backend hands others)."""

    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        self.ops: AttentionOps = REFERENCE_OPS
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = window
        # A backend's kernel for wq, wk and wv at once (backends/quant/linear.py), or None; it returns None for the
        # steps it does not serve. Set only by the conversion pass (backends.attach), like experts_kernel.
        self.projection_kernel: Callable[[torch.Tensor], tuple[torch.Tensor, ...] | None] | None = None
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: BatchPlan,
                cache: RollingCache | None, layer_id: int) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = (self.projection_kernel and self.projection_kernel(x)) or (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        q, k = self.ops.rope(q, *rope), self.ops.rope(k, *rope)
        out = attend(q, k, v, plan.for_window(self.window), None if cache is None else cache[layer_id],
                     self.ops)                                                                  # (T, H, D)
        return self.wo(out.reshape(T, -1))


class FeedForward(nn.Module):
    """SiLU-gated feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        # A backend's kernel for w1 and w3 at once, or None (as Attention's projection_kernel).
        self.projection_kernel: Callable[[torch.Tensor], tuple[torch.Tensor, ...] | None] | None = None
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.projection_kernel and self.projection_kernel(x)) or (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class MoeFeedForward(nn.Module):
    """Mixtral's sparse mixture of experts: each token runs its top-k experts, weighted by a softmax over the
    k chosen router logits. Each expert runs only on the tokens routed to it."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int):
        super().__init__()
        self.k = num_experts_per_tok
        self.on_route: Callable[[torch.Tensor, torch.Tensor], None] | None = None   # observer: sirocco viz
        # A backend's kernel for all the chosen experts at once (backends/moe.py), or None; it returns None for
        # the steps it does not serve.
        self.experts_kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        chosen, weights = self.route(x, router_logits)
        if self.experts_kernel is not None:
            out = self.experts_kernel(x, chosen, weights)
            if out is not None:
                return out
        return self.run_experts(x, chosen, weights)

    def route(self, x: torch.Tensor, router_logits: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k chosen experts (T, k) and their weights (T, k) in x's dtype."""
        logits = self.gate(x)                                              # (T, E)
        if router_logits is not None:
            router_logits.append(logits)
        top_logits, chosen = torch.topk(logits, self.k, dim=-1)            # (T, k)
        weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)   # (T, k)
        if self.on_route is not None:
            self.on_route(chosen, weights)
        return chosen, weights

    def run_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over each token's k choices of weight * expert(x), expert by expert over the tokens routed to it."""
        # Group the (token, choice) pairs by expert with one sort and one host read of the counts per layer.
        flat = chosen.flatten()                                            # (T*k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of = order // self.k
        weight_of = weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                idx = token_of[start:start + n]
                out.index_add_(0, idx, expert(x[idx]) * weight_of[start:start + n])
            start += n
        return out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, args.window_for(layer_id))
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.moe is None:
            self.feed_forward: nn.Module = FeedForward(args.dim, args.hidden_dim)
        else:
            self.feed_forward = MoeFeedForward(args.dim, args.hidden_dim, args.moe.num_experts,
                                               args.moe.num_experts_per_tok)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: BatchPlan,
                cache: RollingCache | None, router_logits: list | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, plan, cache, self.layer_id)
        h = self.ffn_norm(x)
        if isinstance(self.feed_forward, MoeFeedForward):
            return x + self.feed_forward(h, router_logits)
        return x + self.feed_forward(h)


def _embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """``nn.Embedding``, without its random initialisation when built on the meta device (as loaders build the
    model before reading its weights): PyTorch's meta ``normal_`` imports torch._dynamo and its dependencies,
    resident for the rest of the process (docs/performance.md), for a tensor that holds no data."""
    if torch.empty(0).device.type == "meta":           # the default device: meta inside ``with torch.device("meta")``
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return nn.Embedding(vocab_size, dim)


class Transformer(nn.Module):
    """The whole model. Layers sit in a dict keyed by their global index, so a pipeline stage that keeps only
    some of them (and maybe no embedding or no output) keeps the checkpoint's names; ``forward`` passes
    hidden states through where the embedding or the output head is absent."""

    def __init__(self, args: ModelArgs, layers: list[int] | None = None, embed: bool = True, head: bool = True):
        super().__init__()
        self.args = args
        self.tok_embeddings = _embedding(args.vocab_size, args.dim) if embed else None
        layer_ids = range(args.n_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in layer_ids})
        self.norm = RMSNorm(args.dim, args.norm_eps) if head else None
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if head else None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def windows(self) -> list[int | None]:
        return self.args.windows()

    def rope(self, positions: torch.Tensor, needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for these positions, all below ``needed`` (default: max_seq_len). The tables live on the
        positions' device and cover a power of two of positions, at least 4096, at most max_seq_len, rebuilt
        longer when a step needs it: Mistral's 32768 positions are 16 MiB of tables (and three times that while
        they are computed), more than a short conversation's whole cache. A row's values do not depend on the
        table's length."""
        limit = self.args.max_seq_len
        needed = limit if needed is None else min(needed, limit)
        if self._rope is None or self._rope[0].device != positions.device or len(self._rope[0]) < needed:
            length = min(limit, max(4096, 1 << (needed - 1).bit_length()))
            cos, sin = rope_tables(self.args.head_dim, length, self.args.rope_theta)
            self._rope = (cos.to(positions.device), sin.to(positions.device))
        return self._rope[0][positions], self._rope[1][positions]

    def plan(self, lengths: list[int], starts: list[int] | None = None, rows: list[int] | None = None,
             cache: RollingCache | None = None, decode: int | None = None) -> BatchPlan:
        """The step's BatchPlan for this model's windows (and the cache's sizes, if any); ``decode``: how many
        leading sequences are decode sequences (``BatchPlan.build``)."""
        ends = [(s or 0) + n for s, n in zip(starts or [0] * len(lengths), lengths, strict=True)]
        if ends and max(ends) > self.args.max_seq_len:
            raise ValueError(f"a sequence reaches {max(ends)} tokens, past the model's max_seq_len "
                             f"{self.args.max_seq_len}")
        return BatchPlan.build(lengths, starts=starts, rows=rows, windows=self.windows,
                               cache_lens=None if cache is None else cache.cache_lens(),
                               device=self.device, decode=decode)

    def observe_routing(self, observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None) -> None:
        """Have every MoE layer call ``observer(layer_id, chosen (T, k), weights (T, k))`` after its top-k
        (None: stop)."""
        for i, layer in self.layers.items():
            if isinstance(layer.feed_forward, MoeFeedForward):
                layer.feed_forward.on_route = None if observer is None else functools.partial(observer, int(i))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor, plan: BatchPlan | list[int], cache: RollingCache | None = None,
                router_logits: list | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (T,) token ids, or (T, dim) hidden states on a pipeline stage without the embedding.
            plan: a BatchPlan, or just the sequence lengths for a forward without cache from position 0.
            cache: the rolling cache the plan was built for, or None.
            router_logits: if a list is given, each MoE layer appends its (T, n_experts) router logits.
            logits_at: (N,) indices of the tokens whose logits are wanted (pre-fill needs only each prompt's
                last); default all.
        Returns:
            (T or N, vocab_size) logits, or (T, dim) hidden states on a stage without the output head.
        """
        if not isinstance(plan, BatchPlan):
            plan = self.plan(list(plan))
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        ends = (s + n for s, n in zip(plan.starts, plan.lengths, strict=True))
        rope = self.rope(plan.positions, max(ends, default=1))
        for layer in self.layers.values():
            h = layer(h, rope, plan, cache, router_logits)
        if self.output is None or self.norm is None:
            return h
        if logits_at is not None:
            h = h[logits_at]
        return self.output(self.norm(h))


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Random weights for tests and training from scratch: normal(0, std) matrices, scaled down on the
    residual projections (wo, w2) by sqrt(2 * n_layers), ones for norms."""
    g = torch.Generator().manual_seed(seed)
    resid_std = std / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = resid_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
    return model


def build_model(args: ModelArgs, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int | None = 0, **stage: object) -> Transformer:
    """A model with random weights (seeded), in ``dtype`` on ``device``."""
    model = Transformer(args, **stage)  # type: ignore[arg-type]
    if seed is not None:
        init_weights(model, seed)
    return model.to(device=device, dtype=dtype)
