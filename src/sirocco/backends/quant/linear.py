"""``QuantLinear``: an nn.Linear whose weight is held as GGUF blocks (q8_0, q4_0, or any type of layouts.py).

Forward, by where and how many rows:

- CPU, no autograd, 1..8 rows (decode): the C++ kernel of kernels.py over the blocks in place;
- CPU, more rows (pre-fill; rounded up to a multiple of 32 rows, ``bucketed_linear``): the weight dequantized
  to the activations' dtype (fp32 for bf16 rows where the CPU has no fast bf16 GEMM) a tile of output rows at a
  time, each tile multiplied by F.linear (oneDNN) into its slice of the output, so that memory stays bounded
  (never the whole dequantized matrix for big N) while each F.linear call is still large enough to run at full
  rate;
- CUDA (or autograd wanted): dequantize + matmul.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sirocco.backends.cpu.kernels import bucketed_linear, upcast_pays
from sirocco.backends.quant import kernels
from sirocco.backends.quant.formats import QuantizedTensor, dequantize, packed_shape, quantize
from sirocco.backends.quant.hugepages import huge_page_tensors
from sirocco.backends.quant.interleave import deinterleave_, interleavable, interleave_
from sirocco.model.transformer import Attention, FeedForward, MoeFeedForward

# Output rows dequantized at once in pre-fill. The tiles are dequantized in one C++ pass (kernels.dequantize_into)
# into one reused buffer: fp32 where bf16 products are slow (bf16 rows are then multiplied in fp32), bf16 written
# by the pass itself where they are fast (AVX512-BF16 or AMX), so no fp32 tile is cast again. Where bf16 products
# are fast, tiles of 512 rows (GEMMs of only 512 output columns) run well below the matrix library's best and
# 1024 or 2048 rows do not; where they are slow, any size from 256 to 2048 rows matches the whole dequantized weight
# and 128 does not (docs/performance.md, "Pre-fill tiles"). 1024 rows of K = 7168 is 14 MiB of bf16, so memory
# stays bounded whatever N.
PREFILL_TILE_ROWS = 1024


_scratch = threading.local()


def tile_buffer(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) CPU scratch tensor for pre-fill's dequantized tiles, one per thread and dtype, shared by
    every QuantLinear and kept at the largest size asked for (at most PREFILL_TILE_ROWS x the widest K). A fresh
    buffer per call is an allocation large enough for the C library to map new pages each time, and those page
    faults cost more than the dequantization itself (docs/performance.md, "Pre-fill tiles"). The buffer is a
    mapping of its own (hugepages.py), outside the C library's heap."""
    buffers: dict = _scratch.__dict__.setdefault("buffers", {})
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < rows * cols:
        buffers[dtype] = flat = huge_page_tensors([(rows * cols * dtype.itemsize,)])[0].view(dtype)
    return flat[:rows * cols].view(rows, cols)


class QuantLinear(nn.Module):
    qweight: torch.Tensor
    """y = x @ W^T (+ bias) with W (out_features, in_features) stored as GGUF blocks of format ``fmt``.

    The blocks are the uint8 buffer ``qweight`` (``packed_shape((out_features, in_features), fmt)``); ``fmt`` and
    ``shape`` are plain attributes (the format is also in ``extra_repr``). ``layout`` says how ``qweight``'s bytes
    are laid out in memory: "file" (GGUF's rows, as read or quantized) or "interleaved" (interleave.py: the same
    bytes rearranged in place for the AVX512-VNNI decode tiles, ``interleave_``). Whatever the layout, the state
    dict holds the file's blocks, and ``file_blocks()`` gives them: every reader of the blocks as a file's (the GGUF
    writer, ``dequantized_weight``) goes through it."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.layout = "file"
        self.register_buffer("qweight", torch.zeros(packed_shape((out_features, in_features), fmt),
                                                    dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantLinear:
        """A QuantLinear holding ``linear``'s weight quantized to ``fmt`` (its bias kept as it is)."""
        q = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.qweight.copy_(quantize(linear.weight.detach(), fmt))
        if linear.bias is not None and q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear over existing blocks (for example a GGUF tensor's data), without copying them."""
        out_features, in_features = qt.shape
        q = cls(in_features, out_features, qt.fmt, bias=False, device=torch.device("meta"))   # no zeros to drop
        q.qweight = qt.data
        if bias is not None:
            q.bias = nn.Parameter(bias)
        return q

    def file_blocks(self) -> torch.Tensor:
        """The weight's blocks in the file's layout, uint8 ``packed_shape(shape, fmt)``: ``qweight`` itself where it
        is in that layout, else a de-interleaved copy (so writing into the result changes the module only in the
        first case)."""
        return kernels.file_layout(self.qweight, self.fmt, self.layout)

    def interleave_(self) -> bool:
        """Put ``qweight`` in the interleaved layout, in place (a band of rows at a time, never a second copy of the
        whole weight), where it can be: CPU blocks of a multiple of 16 rows. Returns whether it is interleaved."""
        if self.layout == "file" and self.qweight.device.type == "cpu" and interleavable(self.qweight.shape, self.fmt):
            interleave_(self.qweight, self.fmt)
            self.layout = "interleaved"
        return self.layout == "interleaved"

    def deinterleave_(self) -> None:
        """Put ``qweight`` back in the file's layout, in place."""
        if self.layout == "interleaved":
            deinterleave_(self.qweight, self.fmt)
            self.layout = "file"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "file" and prefix + "qweight" in destination:
            destination[prefix + "qweight"] = self.file_blocks()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "qweight" in state_dict:             # a state dict holds the file's blocks
            self.layout = "file"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.file_blocks(), self.fmt, self.shape).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        rows = x2.shape[0]
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None
                                                                        and self.bias.requires_grad))
        if x.device.type == "cpu" and not wants_grad:
            if 1 <= rows <= kernels.MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
                y = kernels.qlinear(x2, self.qweight, self.fmt, layout=self.layout)
            else:
                y = bucketed_linear(x2, self._tiled)
        else:
            y = F.linear(x2, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear over the weight dequantized PREFILL_TILE_ROWS output rows at a time into one reused buffer: in
        x's dtype (bf16 tiles written by the dequantizing pass itself), or for bf16 rows on a CPU without a fast bf16
        GEMM (``upcast_pays``) in fp32 (the dequantized values as they are, each tile's product rounded to bf16
        once), as the CPU backend's bf16 pre-fill does."""
        y = x.new_empty(x.shape[0], self.out_features)
        xc = x.float() if upcast_pays(x) else x
        buf = tile_buffer(min(PREFILL_TILE_ROWS, self.out_features), self.in_features,
                          xc.dtype if xc.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        for n0 in range(0, self.out_features, PREFILL_TILE_ROWS):
            n1 = min(n0 + PREFILL_TILE_ROWS, self.out_features)
            w = kernels.dequantize_into(self.qweight[n0:n1], self.fmt, buf[:n1 - n0], layout=self.layout)
            y[:, n0:n1] = F.linear(xc, w.to(xc.dtype))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"bias={self.bias is not None}" + (f", layout={self.layout}" if self.layout != "file" else ""))


class SharedInputProjections:
    """The quantized projections of one input, in one kernel call per block type (``kernels.qlinear_many``): an
    attention layer's wq, wk, wv or a feed-forward's w1, w3, given to the layer as its ``projection_kernel``. The
    activation rows are quantized once per call and one parallel region covers the weights of the call, where
    separate calls quantize them each time and wake the threads once per weight; each output has the bits of its
    QuantLinear alone. A mix may give the weights different types (Q4_K_M: wv q6_K in some layers, wq and wk
    q4_K), and one call takes one type: ``groups`` are the positions of the weights of each type, in order of
    first appearance (wq, wk, wv of q4_K, q4_K, q6_K: [[0, 1], [2]], two calls). Serves decode steps (CPU, no
    autograd, 1..8 fp32 or bf16 rows); returns None otherwise, and the layer calls its linears one by one. The
    modules' blocks are read at each call, so moving the model moves them too."""

    def __init__(self, linears: list[QuantLinear]):
        self.linears = linears
        fmts = list(dict.fromkeys(m.fmt for m in linears))
        self.groups = [[i for i, m in enumerate(linears) if m.fmt == fmt] for fmt in fmts]
        self.fmts = fmts

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if x.dim() != 2 or torch.is_grad_enabled():
            return None
        out: list[torch.Tensor | None] = [None] * len(self.linears)
        for fmt, group in zip(self.fmts, self.groups, strict=True):
            layouts = {self.linears[i].layout for i in group}
            if len(layouts) != 1:
                return None
            ys = kernels.qlinear_many(x, [self.linears[i].qweight for i in group], fmt, layout=layouts.pop())
            if ys is None:
                return None
            for i, y in zip(group, ys, strict=True):
                out[i] = y
        return tuple(y for y in out if y is not None)


def fuse_projections(model: nn.Module) -> int:
    """Give every attention layer whose wq, wk, wv, and every dense feed-forward whose w1, w3 are QuantLinear
    without bias their ``SharedInputProjections`` (one call per block type among them); returns how many layers
    got one."""
    in_moe = {id(e) for m in model.modules() if isinstance(m, MoeFeedForward) for e in m.experts}
    n = 0
    for m in model.modules():
        group: list[nn.Module]
        if isinstance(m, Attention):
            group = [m.wq, m.wk, m.wv]
        elif isinstance(m, FeedForward) and id(m) not in in_moe:     # experts decode through qmoe
            group = [m.w1, m.w3]
        else:
            continue
        quantized: list[QuantLinear] = [q for q in group if isinstance(q, QuantLinear)]
        if len(quantized) == len(group) and all(q.bias is None for q in quantized):
            m.projection_kernel = SharedInputProjections(quantized)
            n += 1
    return n
