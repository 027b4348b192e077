"""GGUF's block layouts for every weight type sirocco runs, and a torch dequantizer for each.

A weight of shape (N, K) is cut along K into blocks of ``values`` weights, each stored in ``bytes`` bytes; row n
of the packed uint8 tensor (N, K // values * bytes) is the GGUF row n byte for byte. The types, as ggml lays them
out (``d``, ``dmin`` and ``m`` are little-endian fp16; "6-bit scales" are packed as described at ``_k_scales``):

=========  ======  =====  ==========================================================================================
type       values  bytes  block
=========  ======  =====  ==========================================================================================
q8_0       32      34     d, 32 int8 q; value d*q
q4_0       32      18     d, 16 bytes: byte j holds element j (low nibble) and j + 16 (high); value d*(q - 8)
q4_1       32      20     d, m, 16 bytes of nibbles as q4_0; value d*q + m
q5_0       32      22     d, 4 bytes qh (bit j: the fifth bit of element j), 16 bytes as q4_0; value d*(q - 16)
q5_1       32      24     d, m, qh, 16 bytes; value d*q + m
iq4_nl     32      18     d, 16 bytes of 4-bit indices as q4_0 into KVALUES; value d*KVALUES[q]
q2_K       256     84     16 bytes (scale | min << 4 per 16 values), 64 bytes of 2-bit q, d, dmin;
                          value d*scale*q - dmin*min
q3_K       256     110    32 bytes hmask, 64 bytes of 2-bit q, 12 bytes of sixteen 6-bit scales, d;
                          value d*(scale - 32)*(q - 4 where the hmask bit is clear)
q4_K       256     144    d, dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles;
                          value d*scale*q - dmin*min per 32 values
q5_K       256     176    d, dmin, 12 bytes of scales and mins, 32 bytes qh, 128 bytes of nibbles
q6_K       256     210    128 bytes of low nibbles, 64 bytes of high 2 bits, 16 int8 scales, d;
                          value d*scale*(q - 32) per 16 values
iq4_xs     256     136    d, uint16 scales_h, 4 bytes scales_l, 128 bytes of indices into KVALUES;
                          value d*(scale - 32)*KVALUES[q] per 32 values
=========  ======  =====  ==========================================================================================

Which element of a block each quant belongs to is the subject of ``integer_form``: it returns every block as
integers (signed quants per value, integer scales and mins per sub-block) and floats (d, dmin, m), so that

    value = (d * scale) * q  [- dmin * min]  [+ m]            each product and sum rounded to fp32

which is how the ``gguf`` package's numpy dequantizers compute (``gguf.quants.dequantize``); ``dequantize`` is
exactly that, bit for bit (tests/test_quant_layouts.py). The integer form is also what the decode kernels'
definition is written in (kernels.py). Worked example, q4_K: its 12 scale bytes ``s`` give sub-block 5 the scale
``(s[9] & 15) | (s[1] >> 6) << 4`` and the min ``(s[9] >> 4) | (s[5] >> 6) << 4``; its values 160..191 are the
high nibbles of quant bytes 64..95, so value 170 = d*scale*(qs[74] >> 4) - dmin*min.

>>> import torch
>>> block = torch.zeros(1, 144, dtype=torch.uint8)
>>> block[0, :2] = torch.tensor([0x00, 0x3C])            # d = 1.0 (fp16 0x3C00)
>>> block[0, 4] = 3                                      # sub-block 0's scale, 3
>>> block[0, 16] = 0x52                                  # value 0: nibble 2; value 32: nibble 5 (scale 0)
>>> dequantize(block, "q4_K")[0, [0, 32]].tolist()
[6.0, 0.0]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """One GGUF block type: ``values`` weights per block along K in ``bytes`` bytes; ``fp16_fields`` the byte
    offsets of the block's fp16 scales (d first, then dmin or m); ``subblock`` the values sharing one integer scale
    (the block itself for the 32-value types); ``ggml_type`` its number in GGUF (GGMLQuantizationType)."""
    name: str
    values: int
    bytes: int
    fp16_fields: tuple[int, ...]
    subblock: int
    ggml_type: int


LAYOUTS: dict[str, Layout] = {l.name: l for l in (
    Layout("q8_0", 32, 34, (0,), 32, 8),
    Layout("q4_0", 32, 18, (0,), 32, 2),
    Layout("q4_1", 32, 20, (0, 2), 32, 3),
    Layout("q5_0", 32, 22, (0,), 32, 6),
    Layout("q5_1", 32, 24, (0, 2), 32, 7),
    Layout("iq4_nl", 32, 18, (0,), 32, 20),
    Layout("q2_K", 256, 84, (80, 82), 16, 10),
    Layout("q3_K", 256, 110, (108,), 16, 11),
    Layout("q4_K", 256, 144, (0, 2), 32, 12),
    Layout("q5_K", 256, 176, (0, 2), 32, 13),
    Layout("q6_K", 256, 210, (208,), 16, 14),
    Layout("iq4_xs", 256, 136, (0,), 32, 23),
)}
TYPES = tuple(LAYOUTS)
# The non-linear codebook of iq4_nl and iq4_xs.
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def layout(fmt: str) -> Layout:
    try:
        return LAYOUTS[fmt]
    except KeyError:
        raise ValueError(f"unknown quantized format {fmt!r}; known: {', '.join(TYPES)}") from None


def block_bytes(fmt: str) -> int:
    """Bytes per block: 34 for q8_0, 144 for q4_K, ..."""
    return layout(fmt).bytes


def block_values(fmt: str) -> int:
    """Weights per block along K: 32 or 256."""
    return layout(fmt).values


def packed_shape(shape: Sequence[int], fmt: str) -> tuple[int, ...]:
    """The uint8 shape holding a weight of logical ``shape`` (..., K): (..., K // values * bytes); q4_K's (3, 512)
    is (3, 288)."""
    lay = layout(fmt)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % lay.values:
        raise ValueError(f"{fmt}: the last dimension (K) must be a multiple of {lay.values}, got shape {shape}")
    return shape[:-1] + (shape[-1] // lay.values * lay.bytes,)


@dataclass
class IntegerForm:
    """Blocks (..., nb) of one type as integers and floats: ``q`` int32 (..., nb, values) the signed quants
    (q4_0: nibble - 8; q6_K: q - 32; iq4: KVALUES[index]), ``scale`` int32 (..., nb, values // subblock) the
    integer scales (1 for the 32-value types), ``d`` fp32 (..., nb); for q2_K / q4_K / q5_K ``dmin`` fp32 (..., nb)
    and ``min`` int32 (..., nb, values // subblock), the value minus ``dmin * min``; for q4_1 / q5_1 ``m`` fp32
    (..., nb), the value plus ``m``."""
    q: torch.Tensor
    scale: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    min: torch.Tensor | None = None
    m: torch.Tensor | None = None


def _fp16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of each block (B, bytes), as fp32 (B,)."""
    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)[:, 0]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(B, n, 16) bytes -> (B, n, 32): the low nibbles, then the high ones (elements j and j + 16 of byte j)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """(B, n) bytes -> (B, n * 8) bits, little-endian within each byte, then byte after byte: bit i of the result
    is bit i % 8 of byte i // 8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., :count]


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_K / q5_K's 12 scale bytes (B, 12) -> eight 6-bit scales and eight 6-bit mins (B, 8) each. Bytes 0-3
    hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales 4-7 are the low nibbles of bytes 8-11 with the
    top two bits of bytes 0-3 above them, mins 4-7 the high nibbles of bytes 8-11 with the top bits of bytes 4-7."""
    lo, mi, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([mi & 0x3F, (hi >> 4) | ((mi >> 6) << 4)], dim=-1)
    return sc, mn


def _planes(qs: torch.Tensor) -> torch.Tensor:
    """q2_K / q3_K's 64 bytes (B, 64) of 2-bit quants -> (B, 256): value 128 h + 32 t + l is bits 2t, 2t + 1 of
    byte 32 h + l."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def integer_form(packed: torch.Tensor, fmt: str) -> IntegerForm:
    """The blocks of ``packed`` (..., nb * bytes) uint8 in integer form (see ``IntegerForm``)."""
    lay = layout(fmt)
    if packed.dtype != torch.uint8:
        raise ValueError(f"{fmt}: packed blocks must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] % lay.bytes:
        raise ValueError(f"{fmt}: the last dimension of packed blocks must be a multiple of {lay.bytes}, "
                         f"got shape {tuple(packed.shape)}")
    lead, nb = packed.shape[:-1], packed.shape[-1] // lay.bytes
    b = packed.reshape(-1, lay.bytes)
    one = torch.ones(b.shape[0], 1, dtype=torch.int32)
    kv = torch.tensor(KVALUES, dtype=torch.int32)
    d = _fp16(b, lay.fp16_fields[0])
    dmin = mn = m = None
    if fmt == "q8_0":
        q, sc = b[:, 2:].contiguous().view(torch.int8).to(torch.int32), one
    elif fmt in ("q4_0", "q4_1"):
        q, sc = _nibbles(b[:, -16:]).to(torch.int32), one
        if fmt == "q4_0":
            q = q - 8
        else:
            m = _fp16(b, 2)
    elif fmt in ("q5_0", "q5_1"):
        q = (_nibbles(b[:, -16:]) | (_bits(b[:, -20:-16], 32) << 4)).to(torch.int32)
        sc = one
        if fmt == "q5_0":
            q = q - 16
        else:
            m = _fp16(b, 2)
    elif fmt == "iq4_nl":
        q, sc = kv[_nibbles(b[:, 2:]).long()], one
    elif fmt == "q2_K":
        q = _planes(b[:, 16:80]).to(torch.int32)
        sc, mn = (b[:, :16] & 0x0F).to(torch.int32), (b[:, :16] >> 4).to(torch.int32)
        dmin = _fp16(b, 82)
    elif fmt == "q3_K":
        low = _planes(b[:, 32:96]).to(torch.int32)
        high = _bits(b[:, :32], 256).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, 256)   # bit j of byte l
        q = low - 4 * (1 - high.to(torch.int32))                     # value 32 j + l takes bit j of hmask[l]
        s = b[:, 96:108]
        lsc = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=-1)     # scales 0-7, then 8-15: low 4 bits
        hsc = torch.cat([(s[:, 8:12] >> (2 * t)) & 3 for t in range(4)], dim=-1)   # scale 4t + k: byte 8 + k
        sc = (lsc | (hsc << 4)).to(torch.int32) - 32
    elif fmt in ("q4_K", "q5_K"):
        s8, m8 = _k_scales(b[:, 4:16])
        sc, mn, dmin = s8.to(torch.int32), m8.to(torch.int32), _fp16(b, 2)
        qs = b[:, -128:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256).to(torch.int32)   # 64 j + 32 h + l
        if fmt == "q5_K":
            high = _bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, 256)
            q = q | (high.to(torch.int32) << 4)                      # value 32 j + l takes bit j of qh[l]
    elif fmt == "q6_K":
        ql, qh = b[:, :128].reshape(-1, 2, 1, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)            # 128 h + 32 t + l
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
        high = (qh >> shifts) & 3                                                      # (B, 2, 4, 32)
        q = (low | (high << 4)).reshape(-1, 256).to(torch.int32) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
    elif fmt == "iq4_xs":
        sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF         # (B, 1)
        sl = torch.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], dim=-1).reshape(-1, 8).to(torch.int32)
        sc = (sl | (((sh >> (2 * torch.arange(8))) & 3) << 4)) - 32
        q = kv[_nibbles(b[:, 8:].reshape(-1, 8, 16)).reshape(-1, 256).long()]
    else:                                                                              # pragma: no cover
        raise AssertionError(fmt)

    def shaped(t: torch.Tensor, *tail: int) -> torch.Tensor:
        return t.reshape(*lead, nb, *tail)
    per = lay.values // lay.subblock
    return IntegerForm(q=shaped(q, lay.values), scale=shaped(sc.expand(-1, per), per), d=shaped(d),
                       dmin=None if dmin is None else shaped(dmin), min=None if mn is None else shaped(mn, per),
                       m=None if m is None else shaped(m))


def dequantize(packed: torch.Tensor, fmt: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """fp32 weights (``shape``, default (..., nb * values)) of packed blocks (..., nb * bytes): per sub-block
    ``(d * scale) * q``, minus ``dmin * min`` or plus ``m`` where the type has them, each step rounded to fp32 as
    the gguf package's dequantizers round (bit for bit, tests/test_quant_layouts.py)."""
    lay = layout(fmt)
    f = integer_form(packed, fmt)
    per = lay.values // lay.subblock
    dl = f.d[..., None] * f.scale.to(torch.float32)                                    # (..., nb, per)
    q = f.q.to(torch.float32).reshape(*f.q.shape[:-1], per, lay.subblock)
    w = dl[..., None] * q
    if f.min is not None and f.dmin is not None:
        w = w - (f.dmin[..., None] * f.min.to(torch.float32))[..., None]
    if f.m is not None:
        w = w + f.m[..., None, None]
    return as_weight(w, packed, fmt, shape)


def as_weight(w: torch.Tensor, packed: torch.Tensor, fmt: str, shape: Sequence[int] | None) -> torch.Tensor:
    """Dequantized values ``w`` of the blocks ``packed`` (..., nb * bytes) as the weight: (..., K), or ``shape``
    once checked to be the one those blocks hold (q4_K: (3, 288) holds (3, 512), not (3, 256))."""
    w = w.reshape(*packed.shape[:-1], -1)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if packed_shape(shape, fmt) != tuple(packed.shape):
            raise ValueError(f"{fmt}: packed blocks of shape {tuple(packed.shape)} do not hold a weight of "
                             f"shape {shape}")
        w = w.reshape(shape)
    return w


def random_blocks(rows: int, k: int, fmt: str, generator: torch.Generator, scale: float = 1e-2) -> torch.Tensor:
    """Random blocks (rows, K // values * bytes) for tests and benchmarks: every quant and integer-scale bit
    random, each fp16 field (d, dmin, m) a random normal times ``scale`` (finite, so sums stay finite)."""
    lay = layout(fmt)
    shape = packed_shape((rows, k), fmt)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).reshape(-1, lay.bytes)
    for at in lay.fp16_fields:
        v = (torch.randn(b.shape[0], generator=generator) * scale).to(torch.float16)
        b[:, at:at + 2] = v.view(torch.uint8).reshape(-1, 2)
    return b.reshape(shape)
