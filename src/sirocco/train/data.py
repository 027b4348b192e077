"""Packing documents into training rows without padding, and reading them back as batches.

Each document becomes ``<s> text </s>`` and contributes its (input, target) pairs: every token predicts the
next one. The pairs of the documents are laid back to back and cut into rows of T::

    documents   <s> a b c </s>      <s> d e </s>       <s> f g h i j </s>
    inputs      <s> a b c | <s> d e | <s> f           (row 0, T = 8)       g h i j | filler . . .   (row 1)
    targets      a  b c </s>|  d  e </s>|  f  g                              h i j </s>| ignored
    positions    0  1 2 3  |  0  1 2   |  0  1                              0 1 2 3  | 0 1 2 3

A document cut at the end of a row goes on at the start of the next one as a new piece (positions from 0). The
positions give the documents' lengths, so attention is block-diagonal causal within each row (and windowed),
never across documents. The last row of an epoch is completed with a filler piece whose targets are ignored.

The order of the documents is shuffled every epoch by a generator seeded with (seed, epoch), so the rows of an
epoch depend only on the seed and the epoch: a ``DataPosition`` (epoch, row) is all a checkpoint needs to
resume the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from .losses import IGNORE_INDEX, count_targets, document_lengths

FILLER_TOKEN = 0


class Encoder(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


@dataclass
class Batch:
    """B rows of T tokens: ``tokens``, ``targets`` (IGNORE_INDEX: no loss) and ``positions``, all (B, T) long."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        """Lengths of the packed documents (pieces), row after row: the model's packed sequence lengths."""
        return document_lengths(self.positions)

    @property
    def num_targets(self) -> int:
        return count_targets(self.targets)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.targets.to(device), self.positions.to(device))


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: the next batch starts at ``row`` of epoch ``epoch``'s rows."""

    epoch: int = 0
    row: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(texts: Sequence[str], tokenizer: Encoder) -> list[list[int]]:
    """Each text as ``<s> ids </s>``."""
    return [tokenizer.encode(t, bos=True, eos=True) for t in texts]


def pack(docs: Sequence[Sequence[int]], seq_len: int) -> Batch:
    """Pack tokenized documents (each with its BOS and EOS) into rows of ``seq_len`` pairs; see the module
    docstring. Returns all rows as one Batch of shape (rows, seq_len)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    inputs: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for doc in docs:
        if len(doc) < 2:
            continue
        n, at = len(doc) - 1, 0
        while at < n:
            room = seq_len - len(inputs) % seq_len
            take = min(room, n - at)
            inputs += doc[at:at + take]
            targets += doc[at + 1:at + take + 1]
            positions += range(take)
            at += take
    short = -len(inputs) % seq_len
    if short:
        inputs += [FILLER_TOKEN] * short
        targets += [IGNORE_INDEX] * short
        positions += range(short)

    def rows(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long).view(-1, seq_len)
    return Batch(rows(inputs), rows(targets), rows(positions))


class PackedStream:
    """An endless, reproducible stream of training batches over the documents' epochs.

    Args:
        docs: tokenized documents (each with BOS and EOS).
        seq_len: tokens per row (T); rows: rows per micro-batch (B); seed: of every epoch's shuffle.
    """

    def __init__(self, docs: Sequence[Sequence[int]], seq_len: int, rows: int, seed: int):
        self.docs, self.seq_len, self.rows, self.seed = list(docs), seq_len, rows, seed
        self._epochs: dict[int, Batch] = {}
        if self.rows_in_epoch(0) < rows:
            raise ValueError(f"the training documents fill {self.rows_in_epoch(0)} rows of {seq_len} tokens, "
                             f"fewer than the {rows} rows of one micro-batch; lower batch_rows or seq_len")

    def epoch(self, epoch: int) -> Batch:
        """All rows of one epoch (the current one is kept)."""
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.docs), generator=g).tolist()
            self._epochs = {epoch: pack([self.docs[i] for i in order], self.seq_len)}
        return self._epochs[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        return self.epoch(epoch).tokens.shape[0]

    def next(self, at: DataPosition) -> tuple[Batch, DataPosition]:
        """The micro-batch at ``at`` and the position after it. An epoch's last rows that do not fill a
        micro-batch are skipped."""
        if at.row + self.rows > self.rows_in_epoch(at.epoch):
            at = DataPosition(at.epoch + 1, 0)
        rows = self.epoch(at.epoch)
        sl = slice(at.row, at.row + self.rows)
        return Batch(rows.tokens[sl], rows.targets[sl], rows.positions[sl]), DataPosition(at.epoch, at.row + self.rows)

    def tokens_per_epoch(self) -> int:
        return self.rows_in_epoch(0) * self.seq_len


def eval_batches(docs: Sequence[Sequence[int]], seq_len: int, rows: int, max_rows: int | None = None) -> list[Batch]:
    """The validation documents packed in their given order, cut into batches of ``rows`` rows (the last may
    be smaller), at most ``max_rows`` rows in all."""
    packed = pack(docs, seq_len)
    n = packed.tokens.shape[0] if max_rows is None else min(max_rows, packed.tokens.shape[0])
    return [Batch(packed.tokens[i:i + rows][:n - i], packed.targets[i:i + rows][:n - i],
                  packed.positions[i:i + rows][:n - i]) for i in range(0, n, rows)]
