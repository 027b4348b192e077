"""Quantizers for GGUF's K-quant, IQ4 and legacy block types, in torch, following ggml's reference algorithms.

``quantize(weight, qtype)`` turns a float weight (..., K) into the bytes ggml stores for ``qtype``: uint8
(..., K // block * type_size), row n being GGUF's row n byte for byte, so the result can be written into a GGUF
file as it is. The types, values per block and bytes per block (``TYPES``):

- legacy, blocks of 32: ``q4_0`` (18), ``q4_1`` (20), ``q5_0`` (22), ``q5_1`` (24), ``q8_0`` (34): one round to
  nearest from the block's extremes, bit for bit as ggml's reference (and the ``gguf`` package);
- K-quants, super-blocks of 256 (``QK_K``): ``q2_K`` (84), ``q3_K`` (110), ``q4_K`` (144), ``q5_K`` (176),
  ``q6_K`` (210): each sub-block (16 or 32 values) gets its scale (and min) by a search, then the scales are
  themselves quantized to 4, 6 or 8 bits against one fp16 super-block scale, and the values are rounded again
  against the scales as stored;
- ``iq4_nl`` (32 values, 18 bytes) and ``iq4_xs`` (256 values, 136 bytes): 4-bit indices into the non-linear
  codebook ``IQ4_VALUES``, the scale found by a search over candidate scales.

The searches are ggml's (ggml-quants.c, quantizing without an importance matrix, as ``llama-quantize`` does by
default), written here once for all blocks at a time:

- q4_K, q5_K, q2_K (scale and min, ``_search_scale_min``): start from the block's range (min clipped to <= 0),
  then try ``nstep + 1`` stretched scales ``(nmax + rmin + rdelta * i) / (max - min)`` in turn; for each, round
  ``x - min``, and fit scale and min by weighted least squares; a fit of smaller weighted error replaces the
  best so far, and its min is the one the following trials round from. Weights: q4_K and
  q5_K ``sqrt(mean(x^2)) + |x|`` with the squared error, q2_K ``|x|`` with the absolute error.
- q6_K (signed scale, ``_search_scale``): from ``-nmax / max`` (``max`` the value of largest magnitude, signed),
  try 18 scales ``-(nmax + 0.1 i) / max`` for i in -9..9, keep the one of largest ``(sum w x l)^2 / sum w l^2``
  (weights ``x^2``), with scale ``sum w x l / sum w l^2``.
- q3_K (``_refine_signed``): round at ``-nmax / max``, then up to 5 passes of coordinate descent: each value in
  turn moves to the level the current least-squares scale suggests if that raises ``(sum w x l)^2 / sum w l^2``.
- iq4 (``_search_codebook``): the nearest codebook entry at 15 trial scales ``(i - 127) / max``, i in -7..7,
  and the initial ``max / 127``; the scale is the weighted least-squares one of the best trial (weights ``x^2``).

Arithmetic follows ggml's order: fp32 throughout, sums accumulated one term at a time in the order of the
values (``_seqsum``), divisions as divisions, ``nearest_int`` as ggml's bit trick (``_nearest_int``: round half
to even, and its own wrap-around far outside the int range), fp16 with round to nearest even. So on ordinary
weights the bytes are those of ``llama-quantize``'s in nearly every block; where they differ, the result is
still a faithful run of the same search.

The chosen integers are also turned back into values here (``quantize_with_values``), from the decided scales
and levels rather than from the bytes, so that a test can check the packing against an independent
dequantizer: the ``gguf`` package's, applied to the bytes, must give the same fp32 values bit for bit.

Worked example (q4_K, one super-block of -1, 0, 1 repeated): round to nearest from each sub-block's range (min -1,
scale 2/15) cannot hit 0, which lies halfway between levels 7 and 8 (-0.066 once the scales are stored in 6 bits
against fp16 super-block scales); among its stretched scales the search finds 1/7 with min -1, where -1, 0 and 1
are levels 0, 7 and 14:

>>> import torch
>>> x = torch.tensor([-1.0, 0.0, 1.0]).repeat(86)[:256].reshape(1, 256)
>>> packed, plain = quantize_with_values(x, "q4_K", search=False)
>>> packed.shape, [round(v, 4) for v in plain[0, :3].tolist()]
(torch.Size([1, 144]), [-0.9998, -0.0661, 1.001])
>>> packed, searched = quantize_with_values(x, "q4_K")
>>> [round(v, 4) for v in searched[0, :3].tolist()]
[-0.9998, 0.0004, 1.0005]
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from sirocco.backends.quant.formats import round_half_away

QK_K = 256
TYPES: dict[str, tuple[int, int]] = {       # ggml's name: (values per block, bytes per block)
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_K": (QK_K, 84), "q3_K": (QK_K, 110), "q4_K": (QK_K, 144), "q5_K": (QK_K, 176), "q6_K": (QK_K, 210),
    "iq4_nl": (32, 18), "iq4_xs": (QK_K, 136),
}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = float(np.float32(1e-15))     # ggml: a block whose largest magnitude is below this is all zero
CHUNK_VALUES = 1 << 17          # weights quantized at a time, bounding the temporaries of a search
_BATCHED = {"q6_K", "iq4_nl", "iq4_xs"}     # their trials run at once: a smaller chunk keeps them in cache

_F32 = torch.float32


def canonical(qtype: str) -> str:
    """ggml's spelling of a type name, from any case: ``Q4_K`` -> ``q4_K``, ``IQ4_XS`` -> ``iq4_xs``."""
    for name in TYPES:
        if name.lower() == qtype.lower():
            return name
    raise ValueError(f"unknown block type {qtype!r}; known: {', '.join(TYPES)}")


def block_size(qtype: str) -> int:
    """Values per block: 256 for the K types and iq4_xs, 32 for the others."""
    return TYPES[canonical(qtype)][0]


def type_size(qtype: str) -> int:
    """Bytes per block."""
    return TYPES[canonical(qtype)][1]


def packed_shape(shape: Sequence[int], qtype: str) -> tuple[int, ...]:
    """The uint8 shape holding a weight of logical ``shape`` (..., K): (..., K // block * type_size)."""
    shape = tuple(int(s) for s in shape)
    block, size = TYPES[canonical(qtype)]
    if not shape or shape[-1] % block:
        raise ValueError(f"{canonical(qtype)}: the last dimension (K) must be a multiple of {block}, got shape "
                         f"{shape}")
    return shape[:-1] + (shape[-1] // block * size,)


# -- ggml's arithmetic ------------------------------------------------------------------------------------------

def _f32(v: float) -> float:
    """A Python float rounded to fp32 (a constant as C's float arithmetic has it)."""
    return float(np.float32(v))


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b in fp32 as IEEE division, with both sides as tensors (never a multiplication by a reciprocal)."""
    ta = a if isinstance(a, torch.Tensor) else None
    tb = b if isinstance(b, torch.Tensor) else None
    like = ta if ta is not None else tb
    assert like is not None
    if ta is None:
        ta = torch.full_like(like, float(a))
    if tb is None:
        tb = torch.full_like(like, float(b))
    return ta / tb


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: add 1.5 * 2^23 in fp32 and read the low mantissa bits: round half to even for
    |v| < 2^22 (and ggml's own wrap-around beyond). int32, the shape of ``v``."""
    bits = (v.to(_F32) + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one term at a time in order (``s = t[0]; s += t[1]; ...``), as ggml's loops accumulate in
    fp32: torch's own sum adds in another order, which changes the last bits. (n, ...) -> (...); several sums
    at once by stacking them along dim 1."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded: torch's fp32 sqrt on CPU can be one unit off in the last place, so it is
    taken in fp64 (whose rounding to fp32 is then exact for a square root)."""
    return torch.sqrt(v.to(torch.float64)).to(_F32)


def _fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` stored as fp16 (round to nearest even): its two little-endian bytes (..., 2) and its fp32 value."""
    h = v.to(torch.float16)
    return h.view(torch.uint8).reshape(*v.shape, 2), h.to(_F32)


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over dim 0: the largest magnitude and the value that has it, with its sign (the first of equal
    magnitudes, as ggml's ``if (ax > amax)`` keeps). (n, ...) -> two (...)."""
    i = x.abs().argmax(0, keepdim=True)
    v = torch.gather(x, 0, i)[0]
    return v.abs(), v


def _where(c: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    return torch.where(c, a, b)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The low 8 bits of an integer tensor as uint8 (C's conversion of an int to uint8_t)."""
    return (t.to(torch.int32) & 0xFF).to(torch.uint8)


def _as_columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """Blocks (B, m) cut into groups of ``n`` consecutive values, one group per column: (n, B * m // n), so that
    per-group loops over the n values run down dim 0. Group g of block b is column b * (m // n) + g."""
    return x.reshape(-1, n).T.contiguous()


def _from_columns(c: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of ``_as_columns``: (n, G) -> (G * n // m, m)."""
    return c.T.reshape(-1, m)


# -- the searches -----------------------------------------------------------------------------------------------

def _search_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      mad: bool, search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels 0..nmax with a scale and a min per column of ``x`` (n, G), weights ``w`` (n, G): ggml's
    ``make_qkx2_quants``. Returns levels (n, G) int32, scale (G,) and ``-min`` (G,) (value = scale * l + min,
    min <= 0). ``search=False`` stops at the first guess (range / nmax), for comparison.

    The trials run in order because each one starts from the min the last accepted fit left (ggml's loop
    reuses its ``min``), so a later trial's levels depend on the earlier ones' outcome."""
    mn = x.amin(0)
    mn = _where(mn > 0, 0.0, mn)
    mx = x.amax(0)
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    iscale = _div(float(nmax), _where(flat, 1.0, mx - mn))
    scale = _div(1.0, iscale)
    levels = _nearest_int(iscale * (x - mn)).clamp_(0, nmax).to(_F32)
    best = _seqsum(w * _abs_or_square(scale * levels + mn - x, mad))
    if search:
        for i in range(nstep + 1):
            factor = _f32(_f32(_f32(_f32(rdelta) * i) + _f32(rmin)) + nmax)
            trial = _nearest_int(_div(factor, mx - mn) * (x - mn)).clamp_(0, nmax).to(_F32)
            terms = torch.empty((x.shape[0], 3, x.shape[1]), dtype=_F32)
            wl = torch.mul(w, trial, out=terms[:, 0])
            torch.mul(wl, trial, out=terms[:, 1])
            torch.mul(wl, x, out=terms[:, 2])
            sum_l, sum_l2, sum_xl = _seqsum(terms)
            det = sum_w * sum_l2 - sum_l * sum_l
            t_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            t_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clip = t_min > 0
            t_min = _where(clip, 0.0, t_min)
            t_scale = _where(clip, sum_xl / sum_l2, t_scale)
            err = _seqsum(w * _abs_or_square(t_scale * trial + t_min - x, mad))
            better = (det > 0) & (err < best)      # ggml keeps a fit strictly better than the best so far
            levels = _where(better[None], trial, levels)
            best = _where(better, err, best)
            scale = _where(better, t_scale, scale)
            mn = _where(better, t_min, mn)
    levels = _where(flat[None], 0.0, levels)
    scale = _where(flat, 0.0, scale)
    return levels.to(torch.int32), scale, -mn


def _abs_or_square(d: torch.Tensor, mad: bool) -> torch.Tensor:
    return d.abs() if mad else d * d


def _search_scale(x: torch.Tensor, nmax: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed levels -nmax..nmax-1 with one scale per column of ``x`` (n, G), weights x^2: ggml's
    ``make_qx_quants`` (rmse_type 1, no importance). Returns levels + nmax (n, G) int32 (0 where the column is
    all zero) and the scale (G,). ``search=False``: round at -nmax / max and keep that scale."""
    amax, mx = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = _where(zero, 1.0, mx)
    if not search:
        iscale = _div(float(-nmax), mx)
        levels = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1) + nmax
        return _where(zero[None], 0, levels), _where(zero, 0.0, _div(1.0, iscale))
    factors = [-float(nmax)] + [-_f32(nmax + _f32(_f32(0.1) * i)) for i in range(-9, 10) if i]
    iscales = _div(torch.tensor(factors, dtype=_F32)[:, None].expand(-1, mx.shape[0]).contiguous(),
                   mx[None].expand(len(factors), -1))                                   # (T, G)
    trial = torch.round(iscales[None] * x[:, None]).clamp_(-nmax, nmax - 1)   # |.| <= nmax + 1: round is ggml's
    w = x * x
    terms = torch.empty((trial.shape[0], 2, *trial.shape[1:]), dtype=_F32)
    torch.mul((w * x)[:, None], trial, out=terms[:, 0])
    torch.mul(torch.mul(w[:, None], trial, out=terms[:, 1]), trial, out=terms[:, 1])
    sum_lx, sum_l2 = _seqsum(terms)
    scale = _where(sum_l2[0] != 0, sum_lx[0] / sum_l2[0], 0.0)
    best = scale * sum_lx[0]
    choice = torch.zeros_like(mx, dtype=torch.int64)
    for t in range(1, len(factors)):
        better = (sum_l2[t] > 0) & (sum_lx[t] * sum_lx[t] > best * sum_l2[t])
        scale = _where(better, sum_lx[t] / sum_l2[t], scale)
        best = _where(better, scale * sum_lx[t], best)
        choice = _where(better, t, choice)
    levels = trial.gather(1, choice[None, None].expand(trial.shape[0], 1, -1))[:, 0].to(torch.int32) + nmax
    return _where(zero[None], 0, levels), _where(zero, 0.0, scale)


def _refine_signed(x: torch.Tensor, nmax: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed levels -nmax..nmax-1 per column of ``x`` (n, G) by coordinate descent, weights x^2: ggml's
    ``make_q3_quants`` (do_rmse). Returns levels + nmax (n, G) int32 (0 where the column is all zero) and the
    scale (G,). ``search=False``: round at -nmax / max and keep that scale."""
    amax, mx = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = _where(zero, 1.0, mx)
    iscale = _div(float(-nmax), mx)
    levels = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1).to(_F32)                 # (n, G)
    if not search:
        return _where(zero[None], 0, levels.to(torch.int32) + nmax), _where(zero, 0.0, _div(1.0, iscale))
    w = x * x
    wx = w * x
    sum_lx = _seqsum(wx * levels)
    sum_l2 = _seqsum(w * levels * levels)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):         # in order: each move changes the sums the next one sees
            li = levels[i]
            slx = sum_lx - wx[i] * li
            sl2 = sum_l2 - w[i] * li * li
            new = _nearest_int(_div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1).to(_F32)
            slx2 = slx + wx[i] * new
            sl22 = sl2 + w[i] * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * sum_l2 > sum_lx * sum_lx * sl22)
            levels[i] = _where(take, new, li)
            sum_lx = _where(take, slx2, sum_lx)
            sum_l2 = _where(take, sl22, sum_l2)
            changed |= take
        if not changed.any():
            break
    scale = _where(sum_l2 > 0, sum_lx / _where(sum_l2 > 0, sum_l2, 1.0), 0.0)
    return _where(zero[None], 0, levels.to(torch.int32) + nmax), _where(zero, 0.0, scale)


_CODEBOOK = torch.tensor(IQ4_VALUES, dtype=_F32)
# ggml's best_index_int8 picks the lower of two neighbouring entries when x - lower < upper - x, else the upper:
# the nearest entry, ties to the upper. The midpoints between neighbours are multiples of 0.5, and near each one
# both differences are exact in fp32, so the index only changes at half-integers: it is a table lookup on
# floor(2 x), clamped to the codebook's span.
_HALF_LO, _HALF_HI = 2 * IQ4_VALUES[0], 2 * IQ4_VALUES[-1]
_MIDPOINTS = [(a + b) / 2 for a, b in zip(IQ4_VALUES, IQ4_VALUES[1:])]
_CODE_OF_HALF = torch.tensor([sum(j / 2 >= m for m in _MIDPOINTS) for j in range(_HALF_LO, _HALF_HI + 1)])
_VALUE_OF_HALF = _CODEBOOK[_CODE_OF_HALF]


def _halves(v: torch.Tensor) -> torch.Tensor:
    return (v.clamp(IQ4_VALUES[0], IQ4_VALUES[-1]) * 2).floor_().to(torch.int64).sub_(_HALF_LO)


def _nearest_code(v: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry nearest to each value (ggml's ``best_index_int8``: ties to the upper entry,
    the ends clamped). int64, the shape of ``v``."""
    return _CODE_OF_HALF[_halves(v)]


def _nearest_code_value(v: torch.Tensor) -> torch.Tensor:
    """The codebook entry nearest to each value, as fp32 (``IQ4_VALUES[_nearest_code(v)]``)."""
    return _VALUE_OF_HALF[_halves(v)]


def _search_codebook(x: torch.Tensor, search: bool = True) -> torch.Tensor:
    """The scale of each column of ``x`` (32, G) for the iq4 codebook: ggml's ``quantize_row_iq4_nl_impl``
    search (ntry 7, weights x^2, no importance). (G,), 0 for an all-zero column. ``search=False``: the scale
    that maps the value of largest magnitude to -127."""
    amax, mx = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = _where(zero, 1.0, mx)
    if not search:
        return _where(zero, 0.0, _div(mx, float(IQ4_VALUES[0])))
    w = x * x
    d0 = _div(-mx, float(IQ4_VALUES[0]))
    ids = [_div(1.0, d0)] + [_div(float(i + IQ4_VALUES[0]), mx) for i in range(-7, 8)]
    idv = torch.stack(ids)                                                              # (T, G)
    q = _nearest_code_value(idv[None] * x[:, None])                                     # (n, T, G)
    terms = torch.empty((q.shape[0], 2, *q.shape[1:]), dtype=_F32)
    wq = w[:, None] * q
    torch.mul(wq, x[:, None], out=terms[:, 0])
    torch.mul(wq, q, out=terms[:, 1])
    sum_qx, sum_q2 = _seqsum(terms)
    d = _where(sum_q2[0] > 0, sum_qx[0] / sum_q2[0], 0.0)
    best = d * sum_qx[0]
    for t in range(1, idv.shape[0]):
        better = (sum_q2[t] > 0) & (sum_qx[t] * sum_qx[t] > best * sum_q2[t])
        d = _where(better, sum_qx[t] / sum_q2[t], d)
        best = _where(better, d * sum_qx[t], best)
    return _where(zero, 0.0, d)


# -- the K types ------------------------------------------------------------------------------------------------

def _pack_levels_4x2(levels: torch.Tensor) -> torch.Tensor:
    """2-bit levels (B, 256) -> 64 bytes: byte 32 * h + l holds values 128 h + l + 32 s in bits 2s..2s+1."""
    lv = levels.reshape(-1, 2, 4, 32).to(torch.int32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)).reshape(-1, 64).to(torch.uint8)


def _scale_min_bytes(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (B, 8) -> the 12 bytes of q4_K/q5_K: bytes 0-3 scales 0-3, 4-7 mins 0-3 (their
    top two bits the high bits of scales / mins 4-7), 8-11 the low nibbles of scale and min 4-7."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    out = torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)], 1)
    return out.to(torch.uint8)


def _k_scale_min(x: torch.Tensor, nmax: int, sub: int, rmin: float, rdelta: float, nstep: int, search: bool
                 ) -> tuple[torch.Tensor, ...]:
    """q4_K / q5_K of super-blocks ``x`` (B, 256): fp16 bytes of d and dmin, the 12 scale bytes, the levels
    (B, 256) int32, and the values they stand for (B, 256)."""
    cols = _as_columns(x, sub)                                           # (32, B * 8)
    av = _sqrt(_div(_seqsum(cols * cols), float(sub)))
    w = av + cols.abs()
    levels, scales, mins = _search_scale_min(cols, w, nmax, rmin, rdelta, nstep, mad=False, search=search)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = scales.amax(1).clamp(min=0)
    max_min = mins.amax(1).clamp(min=0)
    inv_s = _where(max_scale > 0, _div(63.0, _where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_m = _where(max_min > 0, _div(63.0, _where(max_min > 0, max_min, 1.0)), 0.0)
    ls = (_nearest_int(inv_s[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bytes, d = _fp16(_div(max_scale, 63.0))
    m_bytes, dmin = _fp16(_div(max_min, 63.0))
    ds = (d[:, None] * ls.to(_F32)).reshape(-1)                          # per sub-block, (B * 8,)
    dm = (dmin[:, None] * lm.to(_F32)).reshape(-1)
    again = _nearest_int(_div(cols + dm, ds.expand_as(cols))).clamp_(0, nmax)
    levels = _where(ds[None] == 0, levels, again)                       # ggml skips a sub-block whose scale is 0
    values = ds * levels.to(_F32) - dm
    return (d_bytes, m_bytes, _scale_min_bytes(ls, lm), _from_columns(levels, QK_K), _from_columns(values, QK_K))


def _q4_K(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin, sc, levels, values = _k_scale_min(x, 15, 32, -1.0, 0.1, 20, search)
    lv = levels.reshape(-1, 4, 2, 32)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([d, dmin, sc, qs], 1), values


def _q5_K(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin, sc, levels, values = _k_scale_min(x, 31, 32, -0.5, 0.1, 15, search)
    lv = levels.reshape(-1, 4, 2, 32)
    qs = ((lv[:, :, 0] & 0xF) | ((lv[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)
    high = (levels.reshape(-1, 8, 32) >> 4)                             # bit k of qh[j]: value 32 k + j
    qh = (high << torch.arange(8, dtype=torch.int32)[None, :, None]).sum(1).to(torch.uint8)
    return torch.cat([d, dmin, sc, qh, qs], 1), values


def _q6_K(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _as_columns(x, 16)                                           # (16, B * 16)
    levels, scales = _search_scale(cols, 32, search)
    scales = scales.reshape(-1, 16)
    amax, max_scale = _signed_max(scales.T)
    zero = amax < GROUP_MAX_EPS                                         # ggml writes an all-zero block
    iscale = _div(-128.0, _where(zero, 1.0, max_scale))
    d_bytes, d = _fp16(_where(zero, 0.0, _div(1.0, iscale)))
    sc = _where(zero[:, None], 0, _nearest_int(iscale[:, None] * scales).clamp_(max=127))   # |iscale * s| <= 128
    ds = (d[:, None] * sc.to(_F32)).reshape(-1)
    again = _nearest_int(_div(cols, ds.expand_as(cols))).clamp_(-32, 31) + 32
    levels = _where(ds[None] == 0, levels, again)
    levels = _where(zero.repeat_interleave(16)[None], 0, levels)
    values = ds * (levels - 32).to(_F32)
    levels, values = _from_columns(levels, QK_K), _from_columns(values, QK_K)
    lv = levels.reshape(-1, 2, 4, 32)                                   # (B, half, quarter, 32)
    ql = torch.stack([(lv[:, :, 0] & 0xF) | ((lv[:, :, 2] & 0xF) << 4),
                      (lv[:, :, 1] & 0xF) | ((lv[:, :, 3] & 0xF) << 4)], 2).reshape(-1, 128)
    hi = lv >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), _bytes(sc), d_bytes], 1), values


def _q3_K(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _as_columns(x, 16)                                           # (16, B * 16)
    levels, scales = _refine_signed(cols, 4, search)
    scales = scales.reshape(-1, 16)
    _, max_scale = _signed_max(scales.T)
    some = max_scale != 0
    iscale = _div(-32.0, _where(some, max_scale, 1.0))
    stored = _where(some[:, None], _nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32, 0)   # 0..63
    d_bytes, d = _fp16(_where(some, _div(1.0, iscale), 0.0))
    ds = (d[:, None] * (stored - 32).to(_F32)).reshape(-1)
    again = _nearest_int(_div(cols, ds.expand_as(cols))).clamp_(-4, 3) + 4
    levels = _where(ds[None] == 0, levels, again)
    values = ds * (levels - 4).to(_F32)
    levels, values = _from_columns(levels, QK_K), _from_columns(values, QK_K)
    high = levels >> 2                                                  # bit set: level - 4 >= 0
    hmask = (high.reshape(-1, 8, 32) << torch.arange(8, dtype=torch.int32)[None, :, None]).sum(1).to(torch.uint8)
    qs = _pack_levels_4x2(levels & 3)
    low, top = stored & 0xF, stored >> 4
    sc = torch.cat([low[:, :8] | (low[:, 8:] << 4),
                    top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)], 1)
    return torch.cat([hmask, qs, sc.to(torch.uint8), d_bytes], 1), values


def _q2_K(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _as_columns(x, 16)                                           # (16, B * 16)
    levels, scales, mins = _search_scale_min(cols, cols.abs(), 3, -0.5, 0.1, 15, mad=True, search=search)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale = scales.amax(1).clamp(min=0)
    max_min = mins.amax(1).clamp(min=0)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = _where(has_s[:, None], _nearest_int(_div(15.0, _where(has_s, max_scale, 1.0))[:, None] * scales), 0)
    lm = _where(has_m[:, None], _nearest_int(_div(15.0, _where(has_m, max_min, 1.0))[:, None] * mins), 0)
    sc = (ls & 0xFF) | ((lm << 4) & 0xFF)
    d_bytes, d = _fp16(_where(has_s, _div(max_scale, 15.0), 0.0))
    m_bytes, dmin = _fp16(_where(has_m, _div(max_min, 15.0), 0.0))
    ds = (d[:, None] * (sc & 0xF).to(_F32)).reshape(-1)
    dm = (dmin[:, None] * (sc >> 4).to(_F32)).reshape(-1)
    again = _nearest_int(_div(cols + dm, ds.expand_as(cols))).clamp_(0, 3)
    levels = _where(ds[None] == 0, levels, again)
    values = ds * levels.to(_F32) - dm
    levels, values = _from_columns(levels, QK_K), _from_columns(values, QK_K)
    return torch.cat([sc.to(torch.uint8), _pack_levels_4x2(levels), d_bytes, m_bytes], 1), values


# -- iq4 --------------------------------------------------------------------------------------------------------

def _nibbles_16(idx: torch.Tensor) -> torch.Tensor:
    """Indices (B, 32 k) -> (B, 16 k) bytes: in each group of 32, byte j holds value j (low) and j + 16 (high)."""
    g = idx.reshape(idx.shape[0], -1, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(idx.shape[0], -1).to(torch.uint8)


def _iq4_nl(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _as_columns(x, 32)                                           # (32, B)
    d = _search_codebook(cols, search)
    d_bytes, d16 = _fp16(d)
    idx = _nearest_code(_where(d != 0, _div(1.0, _where(d != 0, d, 1.0)), 0.0) * cols)
    values = d16 * _CODEBOOK[idx]
    return torch.cat([d_bytes, _nibbles_16(idx.T)], 1), values.T.contiguous()


def _iq4_xs(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _as_columns(x, 32)                                           # (32, B * 8)
    scales = _search_codebook(cols, search).reshape(-1, 8)
    amax, max_scale = _signed_max(scales.T)
    max_scale = _where(amax > 0, max_scale, 0.0)        # ggml starts from +0 and keeps it for all-zero scales
    d = _div(-max_scale, 32.0)
    d_bytes, d16 = _fp16(d)
    inv = _where(d != 0, _div(1.0, _where(d != 0, d, 1.0)), 0.0)
    ls = _nearest_int(inv[:, None] * scales).clamp_(-32, 31)            # (B, 8)
    dl = (d[:, None] * ls.to(_F32)).reshape(-1)
    idl = _where(dl != 0, _div(1.0, _where(dl != 0, dl, 1.0)), 0.0)
    idx = _nearest_code(idl * cols)                                     # (32, B * 8)
    values = (d16[:, None] * ls.to(_F32)).reshape(-1) * _CODEBOOK[idx]
    stored = ls + 32
    low, top = stored & 0xF, stored >> 4
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).to(torch.uint8)
    scales_h = (top << (2 * torch.arange(8, dtype=torch.int32))).sum(1)
    h_bytes = torch.stack([scales_h & 0xFF, scales_h >> 8], 1).to(torch.uint8)
    qs = _nibbles_16(_from_columns(idx, QK_K))
    return torch.cat([d_bytes, h_bytes, scales_l, qs], 1), _from_columns(values, QK_K)


# -- legacy types -----------------------------------------------------------------------------------------------

def _extremes_signed(x: torch.Tensor) -> torch.Tensor:
    return _signed_max(x.T)[1]


def _q4_0(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = _div(_extremes_signed(x), -8.0)
    d_bytes, d16 = _fp16(d)
    inv = _where(d == 0, 0.0, _div(1.0, _where(d == 0, 1.0, d)))
    q = (x * inv[:, None] + 8.5).trunc().to(torch.uint8).clamp_(0, 15).to(torch.int32)
    return torch.cat([d_bytes, _nibbles_16(q)], 1), d16[:, None] * (q - 8).to(_F32)


def _q8_0(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = _div(x.abs().amax(1), 127.0)
    d_bytes, d16 = _fp16(d)
    inv = _where(d == 0, 0.0, _div(1.0, _where(d == 0, 1.0, d)))
    q = round_half_away(x * inv[:, None]).to(torch.int8)
    return torch.cat([d_bytes, q.view(torch.uint8)], 1), d16[:, None] * q.to(_F32)


def _first_min(x: torch.Tensor) -> torch.Tensor:
    """Each row's minimum as ggml's ``if (v < min) min = v`` finds it: the first of equal values, so that a
    row of +0 and -0 gets the sign of its first zero (torch's amin may return either)."""
    first = (x == x.amin(1, keepdim=True)).to(torch.uint8).argmax(1, keepdim=True)
    return torch.gather(x, 1, first)[:, 0]


def _affine(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_1 / q5_1: levels 0..nmax from the block's min and max; (d bytes + m bytes, levels, d, m) in fp32."""
    mn, mx = _first_min(x), x.amax(1)
    d = _div(mx - mn, float(nmax))
    d_bytes, d16 = _fp16(d)
    m_bytes, m16 = _fp16(mn)
    inv = _where(d == 0, 0.0, _div(1.0, _where(d == 0, 1.0, d)))
    q = ((x - mn[:, None]) * inv[:, None] + 0.5).trunc().to(torch.uint8).clamp_(0, nmax).to(torch.int32)
    return torch.cat([d_bytes, m_bytes], 1), q, d16, m16


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 levels (B, 32) as four little-endian bytes: bit j of the uint32 is value j's."""
    bits = (q >> 4).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.int32)
    return bits.sum(2).to(torch.uint8)


def _q4_1(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    head, q, d, m = _affine(x, 15)
    return torch.cat([head, _nibbles_16(q)], 1), d[:, None] * q.to(_F32) + m[:, None]


def _q5_1(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    head, q, d, m = _affine(x, 31)
    return torch.cat([head, _high_bits(q), _nibbles_16(q & 0xF)], 1), d[:, None] * q.to(_F32) + m[:, None]


def _q5_0(x: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = _div(_extremes_signed(x), -16.0)
    d_bytes, d16 = _fp16(d)
    inv = _where(d == 0, 0.0, _div(1.0, _where(d == 0, 1.0, d)))
    q = (x * inv[:, None] + 16.5).trunc().to(torch.uint8).clamp_(0, 31).to(torch.int32)
    return torch.cat([d_bytes, _high_bits(q), _nibbles_16(q & 0xF)], 1), d16[:, None] * (q - 16).to(_F32)


_QUANTIZE: dict[str, Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0,
    "q2_K": _q2_K, "q3_K": _q3_K, "q4_K": _q4_K, "q5_K": _q5_K, "q6_K": _q6_K,
    "iq4_nl": _iq4_nl, "iq4_xs": _iq4_xs,
}


# -- the API ----------------------------------------------------------------------------------------------------

def quantize_with_values(w: torch.Tensor, qtype: str, search: bool = True, chunk_values: Optional[int] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` and the fp32 values the chosen scales and levels stand for, computed from them (not from the
    bytes), in ggml's dequantizers' order of operations: ((..., K // block * type_size) uint8, (..., K) fp32)."""
    return _run(w, qtype, search, chunk_values, keep_values=True)  # type: ignore[return-value]


def quantize(w: torch.Tensor, qtype: str, search: bool = True, chunk_values: Optional[int] = None) -> torch.Tensor:
    """A float weight (..., K), K a multiple of the type's block, as ggml's blocks of ``qtype`` (any case:
    ``Q4_K``, ``q4_K``): uint8 (..., K // block * type_size).

    The weight is converted to fp32 (exact from fp16/bf16) and quantized ``chunk_values`` weights at a time
    (default ``CHUNK_VALUES``, an eighth of it for the types whose trials run at once), so memory stays a small
    multiple of the chunk whatever the weight's size. ``search=False`` rounds to nearest
    from each block's first guess (no search), for comparison. Raises ValueError for a K that does not fit the
    block or a weight with inf or nan."""
    return _run(w, qtype, search, chunk_values, keep_values=False)[0]


def _run(w: torch.Tensor, qtype: str, search: bool, chunk_values: Optional[int], keep_values: bool
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    qtype = canonical(qtype)
    out_shape = packed_shape(w.shape, qtype)
    if not w.is_floating_point():
        raise ValueError(f"{qtype}: expected a floating-point weight, got {w.dtype}")
    block, size = TYPES[qtype]
    blocks = w.detach().reshape(-1, block)
    out = torch.empty(blocks.shape[0], size, dtype=torch.uint8)
    values = torch.empty(blocks.shape, dtype=_F32) if keep_values else None
    if chunk_values is None:
        chunk_values = CHUNK_VALUES // 8 if qtype in _BATCHED else CHUNK_VALUES
    step = max(1, chunk_values // block)
    fn = _QUANTIZE[qtype]

    def chunk(start: int) -> None:
        with torch.inference_mode():
            x = blocks[start:start + step].to(device="cpu", dtype=_F32)
            if not torch.isfinite(x).all():
                bad = start + int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
                raise ValueError(f"{qtype}: the weight has a value that is inf or nan (in block {bad} of "
                                 f"{block} values)")
            packed, vals = fn(x, search)
            out[start:start + step] = packed
            if values is not None:
                values[start:start + step] = vals

    starts = range(0, blocks.shape[0], step)
    workers = min(torch.get_num_threads(), len(starts))
    # One chunk per thread, each running torch's operations on one core (a single chunk too): the searches are
    # many small operations, which torch's own threads would meet at a barrier each, and a barrier waits for the
    # slowest core (on a shared machine, one that is busy elsewhere). The chunks are independent, so their bytes
    # do not depend on how they are spread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for start in starts:
                chunk(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(chunk, starts):
                    pass
    finally:
        torch.set_num_threads(threads)
    return out.reshape(out_shape), None if values is None else values.reshape(w.shape)
