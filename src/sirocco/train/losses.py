"""The training objective: next-token cross-entropy over packed documents, and Mixtral's load-balancing loss.

A batch is B rows of T tokens. Each row packs documents back to back; ``positions`` (B, T) holds each token's
position in its document (0 where one starts), from which the documents' lengths (and so the block-diagonal
causal mask) follow. Targets equal to ``IGNORE_INDEX`` carry no loss (a row's filler at the end of an epoch).

The cross-entropy of a step is the *sum* over its target tokens divided by the target tokens of the whole step
(all its micro-batches), so gradients accumulated over micro-batches equal those of one large batch. Shared by
the one-process step (loop.py) and pipeline-parallel training (sirocco.distributed.pipeline_train).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def document_lengths(positions: torch.Tensor) -> list[int]:
    """Lengths of the documents packed in (B, T) rows, row after row, from each token's position in its
    document. Every row must start a document; positions must count 0, 1, 2... within each document.

    >>> document_lengths(torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]))
    [3, 2, 1, 4]
    """
    B, T = positions.shape
    flat = positions.reshape(-1).cpu()
    idx = torch.arange(B * T)
    if (positions[:, 0] != 0).any():
        raise ValueError(f"every row must start a document (position 0); first positions are "
                         f"{positions[:, 0].tolist()}")
    doc_start = torch.where(flat == 0, idx, torch.zeros_like(idx)).cummax(0).values
    if not torch.equal(flat, idx - doc_start):
        bad = int((flat != idx - doc_start).nonzero()[0])
        raise ValueError(f"positions must count up by one within a document; row {bad // T}, column {bad % T} "
                         f"has {int(flat[bad])}, expected {int(idx[bad] - doc_start[bad])}")
    starts = (flat == 0).nonzero().flatten().tolist() + [B * T]
    return [b - a for a, b in pairwise(starts)]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the target tokens, in fp32. logits: (..., V); targets: (...) -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(targets: torch.Tensor) -> int:
    """Target tokens that carry a loss."""
    return int((targets != IGNORE_INDEX).sum())


class BatchTokenLoss:
    """Cross-entropy summed over a micro-batch's target tokens, divided by the target tokens of the whole batch
    (set ``count`` before each step). Summing it over the micro-batches gives the batch's token-mean loss."""

    def __init__(self) -> None:
        self.count = 1

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, targets) / self.count


def load_balancing_loss(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss of one MoE layer: ``E * sum_e f_e * P_e`` with f_e the share of
    the top-k assignments that go to expert e (sums to k) and P_e its mean routing probability; about k when
    routing is even, up to E when every token picks the same experts. router_logits: (T, E) -> scalar fp32."""
    E = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)                        # (T, E)
    chosen = torch.topk(router_logits, k, dim=-1).indices                      # (T, k)
    share = F.one_hot(chosen, E).sum(1).float().mean(0)                        # (E,)
    return E * (share * probs.mean(0)).sum()


def mean_load_balancing_loss(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """The load-balancing loss averaged over the MoE layers of one forward (each a (T, E) tensor)."""
    return torch.stack([load_balancing_loss(r, k) for r in router_logits]).mean()
