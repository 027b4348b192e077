"""``QuantEmbedding``: the token embedding of a GGUF file kept as the file's blocks, its rows dequantized as looked up.

llama.cpp's mixes store the embedding quantized (Q4_K_M: q4_K). Dequantized whole, a 32000 x 4096 table is 0.5 GB
of fp32 beside a 4.4 GB file, the largest thing in memory that is not the file's bytes; kept as blocks it is the
file's 74 MB, and a forward dequantizes only the rows of its tokens. Each value of a row depends on its own block
only, so a row dequantized alone has the bits of the same row of the whole table dequantized
(``convert.dequantize_rows``): the model computes what it computed with the float table.

For everything that reads the model as float tensors the module still looks like ``nn.Embedding``: ``weight`` is
the dequantized table (made on each access; a writer's or a test's, never the forward's), and ``state_dict()``
holds ``weight`` in the model's float dtype, so a model loaded with it and one loaded with the float table have the
same state dict. The float dtype of the output follows ``model.to(dtype)`` through an empty buffer.

Worked example: a (3, 256) table of q4_K has blocks (3, 144); ``forward(tensor([[2, 0]]))`` dequantizes rows 2 and
0 of the blocks, (2, 144) -> (2, 256), and returns them as (1, 2, 256).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sirocco.backends.quant.formats import QuantizedTensor, dequantize


class QuantEmbedding(nn.Module):
    """A token embedding over blocks ``qt`` (shape (vocab, dim)) giving rows in ``dtype`` (see the module
    docstring)."""

    qweight: torch.Tensor
    dtype_probe: torch.Tensor

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype):
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"an embedding table is (vocab, dim), got blocks of shape {list(qt.shape)}")
        self.num_embeddings, self.embedding_dim = qt.shape
        self.fmt = qt.fmt
        self.register_buffer("qweight", qt.data, persistent=False)
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=qt.data.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_probe.dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., dim) rows in the model's dtype."""
        rows = self.qweight.index_select(0, tokens.reshape(-1))
        flat = dequantize(rows, self.fmt, (rows.shape[0], self.embedding_dim))
        return flat.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized (vocab, dim) in the model's dtype: a new tensor on each access."""
        from sirocco.backends.quant.convert import dequantize_rows
        qt = QuantizedTensor(self.qweight, self.fmt, (self.num_embeddings, self.embedding_dim))
        return dequantize_rows(qt, self.dtype, self.qweight.device)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"
