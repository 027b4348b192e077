"""The interleaved layout of quantized weights: each group of 16 rows stored block by block, the 16 rows' pieces of
one block side by side, as the AVX512-VNNI decode tiles read them.

In a GGUF file (and in layouts.py) a weight (N, K) is N rows of blocks, row after row. A decode tile computes 16
outputs at once, so it reads 16 rows in parallel: 16 streams through memory, and per block 16 loads, a gather of
the scales and a transposition in registers before the integer products (csrc/qlinear.cpp). Interleaved, rows
16g .. 16g + 15 are one stream: for each block b, the 16 rows' block b rearranged so that one 64-byte load gives
4 bytes of each of the 16 rows (int32 lane r = row r) and one load gives their 16 fp16 scales. Nothing is added
or dropped: a group's block b is 16 * ``bytes`` bytes, the tensor keeps the shape (N, K // values * bytes) of the
file layout (group g at the bytes of rows 16g .. 16g + 15), and ``deinterleave`` gives the file's bytes back.
Only weights whose N is a multiple of 16 are interleaved.

A group's block is the concatenation of its parts, in this order (offsets within the file block ``o``):

=======  ====================================================================================================
part     bytes in the group's block
=======  ====================================================================================================
half     the fp16 at ``o`` of rows 0..15: 32 bytes (the 16 values in row order)
words    ``n`` bytes at ``o`` (n a multiple of 4) of rows 0..15: n / 4 vectors of 64 bytes, vector k holding
         bytes o + 4k .. o + 4k + 3 of row r at 4r .. 4r + 3 (q8_0's quants with their sign bit flipped: q + 128)
bits32   q5_0 / q5_1's 32 fifth bits: 8 masks of 64 bits, mask j bit 4r + i = the fifth bit of element 4j + i
         of row r (the elements vector j of ``words`` holds: j < 4 low nibbles, j >= 4 high nibbles)
bitsK    q5_K's 32 bytes of fifth bits: 64 masks, mask 16c + 2t + h bit 4r + i = bit 2c + h of qh byte 4t + i
         of row r (the fifth bit of value 64c + 32h + 4t + i, which vector 8c + t of the quants holds)
bits3    q3_K's 32 bytes of high bits: 64 masks, mask 32h + 4u + t bit 4r + i = bit 4h + t of hmask byte 4u + i
         of row r (the high bit of value 128h + 32t + 4u + i, whose low bits are bits 2t, 2t + 1 of byte
         4r + i of quant vector 8h + u)
=======  ====================================================================================================

Worked example, q4_0 (18-byte blocks: d, then 16 bytes of nibbles): a group's block is 288 bytes, the 16 rows' d
(32 bytes) then 4 vectors; byte 32 + 64 * 1 + 4 * 5 + 2 = 118 is byte 2 + 4 * 1 + 2 = 8 of row 5's block.

>>> import torch
>>> file = torch.arange(16 * 18, dtype=torch.int32).to(torch.uint8).reshape(16, 18)
>>> inter = interleave(file, "q4_0")
>>> int(inter.reshape(-1)[118]) == int(file[5, 8])
True
>>> torch.equal(deinterleave(inter, "q4_0"), file)
True
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from sirocco.backends.quant.layouts import layout

GROUP = 16                      # rows per interleaved group: the VNNI tiles' int32 lanes


# Each type's parts, in the order they sit in a group's block: (kind, offset in the file block, bytes).
PARTS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "q8_0": (("half", 0, 2), ("words_x80", 2, 32)),
    "q4_0": (("half", 0, 2), ("words", 2, 16)),
    "q4_1": (("half", 0, 2), ("half", 2, 2), ("words", 4, 16)),
    "q5_0": (("half", 0, 2), ("bits32", 2, 4), ("words", 6, 16)),
    "q5_1": (("half", 0, 2), ("half", 2, 2), ("bits32", 4, 4), ("words", 8, 16)),
    "iq4_nl": (("half", 0, 2), ("words", 2, 16)),
    "q2_K": (("half", 80, 2), ("half", 82, 2), ("words", 0, 16), ("words", 16, 64)),
    "q3_K": (("half", 108, 2), ("words", 96, 12), ("bits3", 0, 32), ("words", 32, 64)),
    "q4_K": (("half", 0, 2), ("half", 2, 2), ("words", 4, 12), ("words", 16, 128)),
    "q5_K": (("half", 0, 2), ("half", 2, 2), ("words", 4, 12), ("bitsK", 16, 32), ("words", 48, 128)),
    "q6_K": (("half", 208, 2), ("words", 192, 16), ("words", 0, 128), ("words", 128, 64)),
    "iq4_xs": (("half", 0, 2), ("half", 2, 2), ("words", 4, 4), ("words", 8, 128)),
}


def interleavable(shape: Sequence[int], fmt: str) -> bool:
    """Whether a weight of ``shape`` (..., N, K) in ``fmt`` can be interleaved: N a multiple of GROUP (and a type
    with an interleaved layout)."""
    return fmt in PARTS and len(shape) >= 2 and shape[-2] % GROUP == 0 and shape[-2] > 0


def _bits(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> (..., n * 8) bits, bit i = bit i % 8 of byte i // 8."""
    return ((x[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(*x.shape[:-1], -1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n * 8) bits -> uint8 (..., n), the inverse of ``_bits``."""
    b = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
    return b.sum(-1, dtype=torch.uint8)


def _groups(packed: torch.Tensor, fmt: str) -> tuple[torch.Tensor, int, int]:
    lay = layout(fmt)
    if fmt not in PARTS:
        raise ValueError(f"{fmt}: no interleaved layout")
    if packed.dtype != torch.uint8 or packed.dim() < 2 or packed.shape[-1] % lay.bytes:
        raise ValueError(f"{fmt}: expected uint8 blocks (..., N, K // {lay.values} * {lay.bytes}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if not interleavable(packed.shape, fmt):
        raise ValueError(f"{fmt}: {packed.shape[-2]} rows are not a multiple of {GROUP}")
    nb = packed.shape[-1] // lay.bytes
    return packed.reshape(-1, GROUP, nb, lay.bytes), nb, lay.bytes


def interleave(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """File-layout blocks (..., N, K // values * bytes), N a multiple of 16 -> a new tensor of the same shape in the
    interleaved layout (see the module docstring)."""
    x, nb, _ = _groups(packed, fmt)
    g = x.shape[0]
    pieces = []
    for kind, at, n in PARTS[fmt]:
        field = x[..., at:at + n]                                           # (G, 16, nb, n)
        if kind == "half":
            pieces.append(field.permute(0, 2, 1, 3).reshape(g, nb, 2 * GROUP))
        elif kind in ("words", "words_x80"):
            v = field.reshape(g, GROUP, nb, n // 4, 4).permute(0, 2, 3, 1, 4).reshape(g, nb, GROUP * n)
            pieces.append(v ^ 0x80 if kind == "words_x80" else v)
        elif kind == "bits32":                    # (G, 16, nb, 32 bits) -> masks j: bits (r, i) of element 4j + i
            bits = _bits(field).reshape(g, GROUP, nb, 8, 4).permute(0, 2, 3, 1, 4)
            pieces.append(_pack_bits(bits.reshape(g, nb, 8, 64)).reshape(g, nb, 64))
        elif kind == "bitsK":                     # qh byte l = 4t + i, bit j = 2c + h -> mask 16c + 2t + h
            bits = _bits(field).reshape(g, GROUP, nb, 8, 4, 4, 2)           # (G, r, nb, t, i, c, h)
            bits = bits.permute(0, 2, 5, 3, 6, 1, 4)                        # (G, nb, c, t, h, r, i)
            pieces.append(_pack_bits(bits.reshape(g, nb, 64, 64)).reshape(g, nb, 512))
        elif kind == "bits3":                     # hmask byte l = 4u + i, bit 4h + t -> mask 32h + 4u + t
            bits = _bits(field).reshape(g, GROUP, nb, 8, 4, 2, 4)           # (G, r, nb, u, i, h, t)
            bits = bits.permute(0, 2, 5, 3, 6, 1, 4)                        # (G, nb, h, u, t, r, i)
            pieces.append(_pack_bits(bits.reshape(g, nb, 64, 64)).reshape(g, nb, 512))
        else:                                                               # pragma: no cover
            raise AssertionError(kind)
    return torch.cat(pieces, dim=-1).reshape(packed.shape)


def deinterleave(inter: torch.Tensor, fmt: str) -> torch.Tensor:
    """The file-layout blocks of an interleaved tensor (``interleave``'s inverse): a new tensor."""
    x, nb, nbytes = _groups(inter, fmt)
    g = x.shape[0]
    y = x.reshape(g, nb, GROUP * nbytes)
    out = torch.empty(g, GROUP, nb, nbytes, dtype=torch.uint8)
    pos = 0
    for kind, at, n in PARTS[fmt]:
        size = GROUP * n
        piece = y[..., pos:pos + size]
        pos += size
        if kind == "half":
            out[..., at:at + n] = piece.reshape(g, nb, GROUP, 2).permute(0, 2, 1, 3)
        elif kind in ("words", "words_x80"):
            v = piece ^ 0x80 if kind == "words_x80" else piece
            out[..., at:at + n] = v.reshape(g, nb, n // 4, GROUP, 4).permute(0, 3, 1, 2, 4).reshape(g, GROUP, nb, n)
        elif kind == "bits32":
            bits = _bits(piece).reshape(g, nb, 8, GROUP, 4).permute(0, 3, 1, 2, 4)
            out[..., at:at + n] = _pack_bits(bits.reshape(g, GROUP, nb, 32))
        elif kind == "bitsK":
            bits = _bits(piece).reshape(g, nb, 4, 8, 2, GROUP, 4)           # (G, nb, c, t, h, r, i)
            bits = bits.permute(0, 5, 1, 3, 6, 2, 4)                        # (G, r, nb, t, i, c, h)
            out[..., at:at + n] = _pack_bits(bits.reshape(g, GROUP, nb, 256))
        elif kind == "bits3":
            bits = _bits(piece).reshape(g, nb, 2, 8, 4, GROUP, 4)           # (G, nb, h, u, t, r, i)
            bits = bits.permute(0, 5, 1, 3, 6, 2, 4)                        # (G, r, nb, u, i, h, t)
            out[..., at:at + n] = _pack_bits(bits.reshape(g, GROUP, nb, 256))
        else:                                                               # pragma: no cover
            raise AssertionError(kind)
    return out.reshape(inter.shape)


def _matrices(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 2-D matrices of t (..., N, bytes) as views (any strides between them)."""
    if t.dim() == 2:
        yield t
    else:
        for sub in t:
            yield from _matrices(sub)


def interleave_(packed: torch.Tensor, fmt: str, rows: int = 1024) -> torch.Tensor:
    """``packed`` interleaved in place, ``rows`` rows (a multiple of 16) at a time, so that no more than that many
    rows are ever held twice; returns ``packed``. (..., N, bytes) with leading dimensions (a MoE layer's stacked
    experts) is interleaved matrix by matrix."""
    return _in_place(packed, fmt, rows, interleave)


def deinterleave_(inter: torch.Tensor, fmt: str, rows: int = 1024) -> torch.Tensor:
    """``inter`` back to the file layout in place, ``rows`` rows at a time (``interleave_``'s inverse)."""
    return _in_place(inter, fmt, rows, deinterleave)


def _in_place(blocks: torch.Tensor, fmt: str, rows: int,
              rearrange: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """``blocks`` overwritten band by band (``rows`` rows of each matrix) with ``rearrange(band, fmt)``."""
    _groups(blocks, fmt)
    with torch.no_grad():
        for mat in _matrices(blocks):
            for r0 in range(0, mat.shape[0], rows):
                band = mat[r0:r0 + rows]
                band.copy_(rearrange(band, fmt))
    return blocks
