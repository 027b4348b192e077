"""The rolling-buffer KV cache of the Mistral design.

Each layer keeps, for keys and for values, a tensor of shape ``(rows, n_kv_heads, S, head_dim)``: one row per
sequence being generated, S slots per row. For a layer with a sliding window W, S = W (W + k with room for k
drafts, below) and the token at absolute position p lives in slot ``p % S`` of its sequence's row, so memory is
bounded by the window however long the generation runs. For a layer without a window (Mistral v0.3, Mixtral),
S = the model's maximum sequence length and ``p % S == p``. Keys are stored after RoPE, so the order of the slots
does not matter to attention once the mask says which slots are valid.

Worked example, W = S = 3, three sequences in rows 0, 1, 2 that have already seen [0, 1, 3] tokens and bring
[5, 7, 2] new ones (this is the example of the reference implementation):

    positions       0 1 2 3 4 | 1 2 3 4 5 6 7 | 3 4
    written?        0 0 1 1 1 | 0 0 0 0 1 1 1 | 1 1      (only the last min(n, S) tokens of a chunk survive)
    slot p % S      . . 2 0 1 | . . . . 0 1 2 | 0 1
    flat slot       . . 2 0 1 | . . . . 3 4 5 | 6 7      (row * S + slot, for a cache viewed as (rows*S,))

Before this step row 2 held positions 0, 1, 2 in slots 0, 1, 2. Its pre-fill attention reads them back oldest
first (``unrotate``): seen = 3, so ``cat(row[3 % 3:], row[:3 % 3])`` = slots [0, 1, 2] = positions [0, 1, 2].
Had it seen 4 tokens (positions 1, 2, 3 in slots 1, 2, 0), unrotate gives slots [1, 2, 0]: oldest first again.

Room for drafts (speculative decoding, ``spare_slots = k``): a windowed row gets S = W + k slots, so that a step
may write the keys of k proposed tokens without overwriting a key still inside the window of the position they
follow. Rollback is bookkeeping only: the engine forgets the rejected positions (the row's cached count goes
back) and their slots are overwritten when the sequence reaches those positions again; attention never reads
them, because the plan's masks and slot maps are computed from positions, not slots (``plan.py``, canonical
order). Worked example, W = 3, k = 2, S = 5: a row that has seen positions 0..6 (the ring wrapped: position 5 is
in slot 0) verifies the draft [a, b] after its last token t at position 7:

    slot                   0  1  2  3  4
    before the step        5  6  2  3  4      the window of the next query (7) is 5..7
    after the write        5  6  7  8  9      t, a, b at positions 7, 8, 9 (slots 7 % 5, 8 % 5, 9 % 5)
    query 7 (t) reads slots 0 1 2 = positions 5 6 7; query 8 (a): 6 7 8; query 9 (b): 7 8 9

If a is accepted and b rejected, the row keeps positions 0..8 (cached 9): slot 4 still holds b's key, which no
query reads (a query at 9 or later reads the slot of position 9 only after writing its own key there), and the
token the target chose instead of b is written over it at the next step. With S = W = 3 the write of 8 and 9
would have landed on slots 2 and 0, overwriting positions 5 and 6, which the query at 7 still needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import ModelArgs

if TYPE_CHECKING:
    from .plan import WindowPlan


class LayerCache:
    """Keys and values of one layer: two tensors ``(rows, n_kv_heads, S, head_dim)``."""

    def __init__(self, rows: int, n_kv_heads: int, size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (rows, n_kv_heads, size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def write(self, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan) -> None:
        """Store the new keys/values ``(T, n_kv_heads, head_dim)`` of a step at the plan's (row, slot) pairs."""
        src = plan.write_src
        assert src is not None, "a plan without a cache"
        if src.numel() == len(k):          # every token is written: skip the gather
            self.k[plan.write_row, :, plan.write_slot] = k
            self.v[plan.write_row, :, plan.write_slot] = v
        else:
            self.k[plan.write_row, :, plan.write_slot] = k[src]
            self.v[plan.write_row, :, plan.write_slot] = v[src]

    def prefix(self, plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values each sequence's pre-fill chunk attends to, oldest first, packed:
        ``(n_prefix, n_kv_heads, head_dim)``."""
        return (self.k[plan.prefix_row, :, plan.prefix_slot], self.v[plan.prefix_row, :, plan.prefix_slot])

    def rows_view(self, plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a decode step's sequences, first ``decode_len`` slots: ``(B, n_kv_heads, L, head_dim)``.
        A view when the rows are 0..B-1 (the engine keeps them so), a gather otherwise."""
        rows, n = plan.rows, plan.decode_len
        assert rows is not None, "a plan without a cache"
        if rows == list(range(len(rows))):
            return self.k[:len(rows), :, :n], self.v[:len(rows), :, :n]
        idx = torch.tensor(rows, device=self.k.device)
        return self.k[idx, :, :n], self.v[idx, :, :n]

    def move_row(self, src: int, dst: int) -> None:
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])


class RollingCache:
    """The KV cache of a whole model: one ``LayerCache`` per layer, allocated once and reused.

    ``rows`` is the most sequences generated at once. ``max_seq_len`` (default the model's) sizes the layers
    without a window. ``spare_slots``: room for that many draft positions beside each windowed row's window
    (speculative decoding; see the module's docstring). Memory: ``2 * rows * sum_l(S_l) * n_kv_heads * head_dim
    * itemsize`` bytes.
    """

    def __init__(self, args: ModelArgs, rows: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_seq_len: int | None = None,
                 layers: list[int] | None = None, spare_slots: int = 0):
        if spare_slots < 0:
            raise ValueError(f"spare_slots must be >= 0, got {spare_slots}")
        self.rows = rows
        self.spare_slots = spare_slots
        self.max_seq_len = max_seq_len or args.max_seq_len
        self.windows = args.windows()
        layer_ids = range(args.n_layers) if layers is None else layers
        self.layers: dict[int, LayerCache] = {
            i: LayerCache(rows, args.n_kv_heads, self.size_for(self.windows[i]), args.head_dim, dtype, device)
            for i in layer_ids}

    def size_for(self, window: int | None) -> int:
        """Slots per row for layers with this window: W (+ the spare slots), at most the maximum sequence length,
        which is also the size without a window."""
        return self.max_seq_len if window is None else min(window + self.spare_slots, self.max_seq_len)

    def cache_lens(self) -> dict[int | None, int]:
        """``{window: S}`` for ``BatchPlan.build``."""
        return {w: self.size_for(w) for w in set(self.windows)}

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def move_row(self, src: int, dst: int) -> None:
        """Copy a sequence's row to another row (the engine compacts rows when a sequence finishes)."""
        for layer in self.layers.values():
            layer.move_row(src, dst)

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values())
