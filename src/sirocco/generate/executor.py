"""The model call of a step, and the choice of its next tokens: what the engine hands to an executor.

The engine (engine.py) decides what runs in a step: which sequences, how many tokens each, at which positions
and cache rows. An executor runs it: it owns the cache, calls the model, and samples. ``LocalExecutor`` runs the
whole model in this process; ``distributed.executor.PipelineExecutor`` runs one pipeline stage per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..cache import RollingCache
from ..model import Transformer
from ..plan import BatchPlan
from .sampling import RowSampling, Sampled, sample


class Executor(Protocol):
    model: Transformer

    def make_cache(self, rows: int, max_seq_len: int, spare_slots: int = 0) -> RollingCache:
        """The cache the engine's plans index into (``spare_slots``: room for drafts, ``RollingCache``)."""
        ...

    def forward(self, tokens: torch.Tensor, plan: BatchPlan, cache: RollingCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
        """(T,) tokens -> (N, vocab) logits of the ``logits_at`` tokens (all without it), or None on a process
        that does not hold the output head."""
        ...

    def sample(self, logits: torch.Tensor | None, rows: Sequence[RowSampling]) -> list[Sampled]:
        """Each row's tokens, log-probabilities and top-k alternatives from the step's ``logits`` (``sampling.sample``),
        as host lists, the same on every process."""
        ...

    def share(self, values: Sequence[float]) -> list[float]:
        """The first process's ``values`` on every process (for a decision every process must make alike)."""
        ...


class LocalExecutor:
    """The whole model in this process."""

    def __init__(self, model: Transformer):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def make_cache(self, rows: int, max_seq_len: int, spare_slots: int = 0) -> RollingCache:
        return RollingCache(self.model.args, rows=rows, dtype=self.dtype, device=self.device, max_seq_len=max_seq_len,
                            spare_slots=spare_slots)

    def forward(self, tokens: torch.Tensor, plan: BatchPlan, cache: RollingCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.model(tokens, plan, cache, logits_at=logits_at)

    def sample(self, logits: torch.Tensor | None, rows: Sequence[RowSampling]) -> list[Sampled]:
        assert logits is not None
        return sample(logits, rows)

    def share(self, values: Sequence[float]) -> list[float]:
        return list(values)
