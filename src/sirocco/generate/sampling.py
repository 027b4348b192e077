"""Turning a row of logits into the next token.

Each sequence samples with its own ``torch.Generator`` so that what it generates does not depend on which other
sequences share its batch. Log-probabilities are always those of the unmodified distribution (before
temperature, top-k and top-p), as the ``--json`` output promises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class SamplingParams:
    """How one sequence is continued.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_p: keep the smallest set of tokens whose probability sums to at least top_p (1 keeps all).
        top_k: keep the k most likely tokens (0 keeps all).
        seed: seed of this sequence's random generator (None: a fresh random seed).
        stop: strings that end the generation; the text stops before them.
        stop_on_eos: end at the end-of-sequence token.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled and filtered logits (V,) fp32: removed tokens get -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the first always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-probability for each row.

    Args:
        logits: (B, V) raw logits; params and generators: one per row.
    Returns:
        tokens (B,) long and logprobs (B,) fp32 under the unmodified distribution, both on logits' device
        (no host synchronisation).
    """
    tokens = torch.argmax(logits, dim=-1)
    sampled = [b for b, p in enumerate(params) if p.temperature > 0]
    if sampled:
        picks = []
        for b in sampled:
            p = params[b]
            probs = torch.softmax(filter_logits(logits[b], p.temperature, p.top_k, p.top_p), dim=-1)
            picks.append(torch.multinomial(probs, 1, generator=generators[b]))
        tokens = tokens.index_put((torch.tensor(sampled, device=logits.device),), torch.cat(picks))
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs


def make_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
