"""GGUF's block formats ``q8_0`` and ``q4_0`` in their exact byte layouts, quantized and dequantized with torch.

A weight of shape (N, K) (nn.Linear's (out, in)) is cut along K into blocks of 32 weights; each block is stored as
a little-endian fp16 scale ``d`` followed by its quants:

- ``q8_0``: 34 bytes per block: ``d``, then 32 int8 ``q``; value ``d * q``. Quantizer: ``d = max|x| / 127``,
  ``q = round(x / d)`` with ties away from zero (computed as ``x * (1/d)`` in fp32, as ggml does).
- ``q4_0``: 18 bytes per block: ``d``, then 16 bytes; byte ``j`` holds element ``j`` in its low nibble and element
  ``j + 16`` in its high nibble; value ``d * (nibble - 8)``. Quantizer: ``m`` = the element of largest magnitude
  with its sign (the first one on ties), ``d = m / -8``, ``nibble = min(15, trunc(x * (1/d) + 8.5))``.

The other GGUF types (q4_1 .. q6_K, iq4_xs) are laid out in layouts.py; ``block_bytes``, ``packed_shape``,
``dequantize`` and ``QuantizedTensor`` here take them too (through layouts.py), ``quantize`` and ``unpack`` only
these two.

The packed tensor of a (N, K) weight is uint8 (N, K // 32 * block_bytes): row n is the GGUF row n, byte for byte,
so a GGUF tensor's data can be used as it is and ours written into a GGUF file. ``quantize`` reproduces the
``gguf`` package's reference quantizer (``gguf.quants.quantize``, itself bit-exact with ggml's C reference for
these two types) and ``dequantize`` its dequantizer, bit for bit (tests/test_quant_formats.py).

Worked example (q8_0, one block): x = [1.0, -2.5, 0, ..., 0] gives d = 2.5/127 = 0.019685..., stored as fp16
0.019683838; q = [round(1.0 * 127/2.5), -127, 0, ...] = [51, -127, 0, ...]; dequantized:
[1.0038757, -2.4998474, 0, ...]

>>> import torch
>>> x = torch.zeros(1, 32); x[0, 0], x[0, 1] = 1.0, -2.5
>>> packed = quantize(x, "q8_0")
>>> packed.shape, packed.dtype
(torch.Size([1, 34]), torch.uint8)
>>> packed[0, 2:5].view(torch.int8).tolist()
[51, -127, 0]
>>> dequantize(packed, "q8_0", (1, 32))[0, :3].tolist()
[1.003875732421875, -2.499847412109375, 0.0]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sirocco.backends.quant import layouts

BLOCK = 32                                     # weights per block, along K
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}
FORMATS = tuple(BLOCK_BYTES)


def block_bytes(fmt: str) -> int:
    """Bytes per block: 34 for q8_0, 18 for q4_0 (blocks of 32 weights); layouts.py's for the other types."""
    if fmt not in BLOCK_BYTES:
        return layouts.block_bytes(fmt)
    return BLOCK_BYTES[fmt]


def packed_shape(shape: Sequence[int], fmt: str) -> tuple[int, ...]:
    """The uint8 shape holding a weight of logical ``shape`` (..., K): (..., K // 32 * block_bytes); for the
    other types layouts.packed_shape (K // values * bytes)."""
    if fmt not in BLOCK_BYTES:
        return layouts.packed_shape(shape, fmt)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % BLOCK:
        raise ValueError(f"{fmt}: the last dimension (K) must be a multiple of {BLOCK}, got shape {shape}")
    return shape[:-1] + (shape[-1] // BLOCK * block_bytes(fmt),)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded once, as IEEE division (and numpy) does: a tensor divisor, so that no kernel can turn the
    division by a scalar into a multiplication by its reciprocal."""
    return a / torch.full_like(a, b)


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) on fp32, computed as the gguf package does (floor of the magnitude plus
    floor of twice its fraction, both exact), so the result is exact for every finite input."""
    a = v.abs()
    floored = a.floor()
    return torch.sign(v) * (floored + (2 * (a - floored)).floor())


def _blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    packed_shape(w.shape, fmt)                 # validates K
    if not w.is_floating_point():
        raise ValueError(f"{fmt}: expected a floating-point weight, got {w.dtype}")
    return w.detach().to(torch.float32).reshape(-1, BLOCK)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize a float weight (..., K), K a multiple of 32, to GGUF blocks: uint8 (..., K // 32 * block_bytes).

    Bit-exact with ``gguf.quants.quantize(w.float().numpy(), GGMLQuantizationType.Q8_0 / Q4_0)``. The input is
    converted to fp32 first (exact from fp16/bf16). Vectorised over all blocks; memory about 3x the fp32 weight.
    """
    if fmt not in BLOCK_BYTES:
        layouts.layout(fmt)                                          # an unknown name is refused as such
        raise ValueError(f"{fmt}: no quantizer here (q8_0 and q4_0 only)")
    out_shape = packed_shape(w.shape, fmt)
    x = _blocks(w, fmt)                                              # (B, 32) fp32
    if fmt == "q8_0":
        d = _div(x.abs().amax(-1, keepdim=True), 127.0)
        q = round_half_away(x * _reciprocal_or_zero(d)).to(torch.int8).view(torch.uint8)
    else:
        imax = x.abs().argmax(-1, keepdim=True)                      # first of equal magnitudes, like numpy
        d = _div(torch.gather(x, -1, imax), -8.0)
        v = x * _reciprocal_or_zero(d) + 8.5
        nib = v.trunc().to(torch.uint8).clamp_(0, 15)
        q = nib[:, :BLOCK // 2] | (nib[:, BLOCK // 2:] << 4)
    scale = d.to(torch.float16).view(torch.uint8)                    # (B, 2), little-endian like GGUF
    return torch.cat([scale, q], dim=-1).reshape(out_shape)


def unpack(packed: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer weights and scales of packed blocks (..., nb * block_bytes): ``q`` int8 (..., nb, 32) (q4_0's
    nibbles minus 8, in -8..7) and ``d`` fp32 (..., nb), so that the weight is ``q * d[..., None]``."""
    if fmt not in BLOCK_BYTES:
        layouts.layout(fmt)
        raise ValueError(f"{fmt}: unpack takes q8_0 and q4_0; layouts.integer_form takes every type")
    if packed.dtype != torch.uint8:
        raise ValueError(f"{fmt}: packed blocks must be uint8, got {packed.dtype}")
    bb = block_bytes(fmt)
    if packed.dim() == 0 or packed.shape[-1] % bb:
        raise ValueError(f"{fmt}: the last dimension of packed blocks must be a multiple of {bb}, "
                         f"got shape {tuple(packed.shape)}")
    lead = packed.shape[:-1]
    blocks = packed.reshape(-1, bb)
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)          # (B, 1)
    if fmt == "q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8)
    else:
        qs = blocks[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int8) - 8
    nb = packed.shape[-1] // bb
    return q.reshape(*lead, nb, BLOCK), d.reshape(*lead, nb)


def dequantize(packed: torch.Tensor, fmt: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """fp32 weights (``shape``, default (..., nb * 32)) from packed blocks (..., nb * block_bytes).

    Bit-exact with ``gguf.quants.dequantize`` (each value ``q * d`` is exact in fp32); the other types through
    layouts.dequantize."""
    if fmt not in BLOCK_BYTES:
        return layouts.dequantize(packed, fmt, shape)
    q, d = unpack(packed, fmt)
    return layouts.as_weight(q.to(torch.float32) * d[..., None], packed, fmt, shape)


@dataclass
class QuantizedTensor:
    """A weight of logical ``shape`` (..., K) stored as GGUF blocks ``data`` (uint8 ``packed_shape(shape, fmt)``)
    in format ``fmt`` (any type of layouts.py)."""
    data: torch.Tensor
    fmt: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != packed_shape(self.shape, self.fmt):
            raise ValueError(f"{self.fmt}: data {self.data.dtype} {tuple(self.data.shape)} does not hold a weight "
                             f"of shape {self.shape} (expected uint8 {packed_shape(self.shape, self.fmt)})")

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str) -> QuantizedTensor:
        return cls(quantize(w, fmt), fmt, tuple(w.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed blocks."""
        return self.data.numel() * self.data.element_size()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.fmt, self.shape)
