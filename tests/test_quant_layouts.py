"""Every GGUF block type of layouts.py: its constants are gguf's, its torch dequantizer and the C++ one
(kernels.dequantize_into, pre-fill's tiles) give the gguf package's numpy values bit for bit, on random blocks and
on blocks at the edges (extreme and zero scales, every quant at its largest or smallest)."""

import numpy as np
import pytest
import torch

from sirocco.backends.quant import formats, layouts
from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant.formats import QuantizedTensor

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

TYPES = list(layouts.TYPES)
NEW = [t for t in TYPES if t not in ("q8_0", "q4_0")]
needs_kernel = pytest.mark.skipif(not qk.kernel_available(), reason="the quantized C++ kernels are not built here")
F16_EXTREMES = {                      # fp16 bit patterns of the scales at their edges, all finite
    "largest": 0x7BFF, "most negative": 0xFBFF, "smallest subnormal": 0x0001, "negative subnormal": 0x8001,
    "largest subnormal": 0x03FF, "smallest normal": 0x0400, "zero": 0x0000, "negative zero": 0x8000, "one": 0x3C00,
}


def gguf_dequantize(packed: torch.Tensor, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(packed.numpy(), GGMLQuantizationType(layouts.layout(fmt).ggml_type))


def same_bits(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    return ours.shape == theirs.shape and np.array_equal(ours.numpy().view(np.uint32), theirs.view(np.uint32))


def with_scales(blocks: torch.Tensor, fmt: str, bits: int) -> torch.Tensor:
    """``blocks`` (rows, nb * bytes) with every fp16 field of every block set to the fp16 ``bits``."""
    lay = layouts.layout(fmt)
    b = blocks.clone().reshape(-1, lay.bytes)
    for at in lay.fp16_fields:
        b[:, at] = bits & 0xFF
        b[:, at + 1] = bits >> 8
    return b.reshape(blocks.shape)


def edge_blocks(fmt: str) -> dict[str, torch.Tensor]:
    """Named (4, 3 * bytes) blocks at the edges: every quant and integer scale bit set (all-max indices, 6-bit
    scales of 63), every one clear, alternating patterns, random bits; each with its fp16 fields at each extreme."""
    lay = layouts.layout(fmt)
    g = torch.Generator().manual_seed(lay.ggml_type)
    shape = (4, 3 * lay.bytes)
    bits = {
        "all ones": torch.full(shape, 0xFF, dtype=torch.uint8),
        "all zeros": torch.zeros(shape, dtype=torch.uint8),
        "0x55": torch.full(shape, 0x55, dtype=torch.uint8),
        "0xAA": torch.full(shape, 0xAA, dtype=torch.uint8),
        "random": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
    }
    return {f"{b}, scales {s}": with_scales(t, fmt, v) for b, t in bits.items() for s, v in F16_EXTREMES.items()}


@pytest.mark.parametrize("fmt", TYPES)
def test_layout_constants_are_ggufs(fmt):
    lay = layouts.layout(fmt)
    qtype = GGMLQuantizationType(lay.ggml_type)
    assert qtype.name.lower() == fmt.lower()
    assert GGML_QUANT_SIZES[qtype] == (lay.values, lay.bytes)
    assert layouts.packed_shape((3, 5, 2 * lay.values), fmt) == (3, 5, 2 * lay.bytes)
    assert formats.packed_shape((3, 2 * lay.values), fmt) == (3, 2 * lay.bytes)
    assert qk.packed_shape((3, 2 * lay.values), fmt) == (3, 2 * lay.bytes)


@pytest.mark.parametrize("fmt", TYPES)
def test_dequantize_matches_gguf_on_random_blocks(fmt):
    g = torch.Generator().manual_seed(7)
    lay = layouts.layout(fmt)
    for scale in (1e-3, 1.0, 3e4):
        packed = layouts.random_blocks(24, 5 * lay.values, fmt, g, scale=scale)
        ours = layouts.dequantize(packed, fmt)
        assert same_bits(ours, gguf_dequantize(packed, fmt)), scale
        assert torch.isfinite(ours).all() or scale > 1
    stacked = layouts.random_blocks(6, 2 * lay.values, fmt, g).reshape(2, 3, -1)         # experts (E, N, bytes)
    w = layouts.dequantize(stacked, fmt, (2, 3, 2 * lay.values))
    assert same_bits(w.reshape(6, -1), gguf_dequantize(stacked.reshape(6, -1), fmt))


@pytest.mark.parametrize("fmt", TYPES)
def test_dequantize_matches_gguf_on_edge_blocks(fmt):
    for name, packed in edge_blocks(fmt).items():
        theirs = gguf_dequantize(packed, fmt)
        if not np.isfinite(theirs).all():              # inf - inf and the like: the same non-finite values
            ours = layouts.dequantize(packed, fmt).numpy()
            assert np.array_equal(ours, theirs, equal_nan=True), name
        else:
            assert same_bits(layouts.dequantize(packed, fmt), theirs), name


def test_the_codebook_and_a_few_values_by_hand():
    """Direct checks of the documented layouts (not only agreement with gguf)."""
    assert tuple(gguf.quants.IQ4_NL.kvalues) == layouts.KVALUES
    # q6_K: value 70 is the high nibble of ql byte 6 with bits 4-5 of qh byte 6 above it, minus 32, times d * scale 4
    b = torch.zeros(1, 210, dtype=torch.uint8)
    b[0, 6] = 0x90                                   # high nibble 9
    b[0, 128 + 6] = 0x20                             # bits 4-5 = 2
    b[0, 192 + 4] = 3                                # scale of values 64..79
    b[0, 208:210] = torch.tensor([0x00, 0x40])       # d = 2
    assert layouts.dequantize(b, "q6_K")[0, 70].item() == 2 * 3 * (9 + 32 - 32)
    # q3_K: value 32 t + l takes bit t of hmask byte l; a clear bit subtracts 4
    b = torch.zeros(1, 110, dtype=torch.uint8)
    b[0, 32 + 5] = 0b00001100                        # plane 1 of byte 5: q = 3, value 37
    b[0, 5] = 0b00000010                             # its high bit set: no offset
    b[0, 108:110] = torch.tensor([0x00, 0x3C])       # d = 1; all scales 0 - 32 = -32
    w = layouts.dequantize(b, "q3_K")[0]
    assert w[37].item() == -32 * 3 and w[5].item() == -32 * -4
    # iq4_xs: block 3's scale is nibble 3 of scales_l with bits 6-7 of scales_h above it, minus 32
    b = torch.zeros(1, 136, dtype=torch.uint8)
    b[0, 0:2] = torch.tensor([0x00, 0x3C])           # d = 1
    b[0, 2] = 0b10000000                             # scales_h: block 3's high bits = 2
    b[0, 5] = 0x70                                   # scales_l byte 1, high nibble: block 3's low bits = 7
    b[0, 8 + 16 * 3] = 0x0F                          # block 3, value 0: index 15
    assert layouts.dequantize(b, "iq4_xs")[0, 96].item() == (7 + 32 - 32) * 113


@pytest.mark.parametrize("fmt", NEW)
def test_integer_form_rebuilds_the_values(fmt):
    """value = d * scale * q - dmin * min (+ m) over the integer form, up to fp32 rounding (dequantize's order)."""
    lay = layouts.layout(fmt)
    packed = layouts.random_blocks(5, 2 * lay.values, fmt, torch.Generator().manual_seed(3))
    f = layouts.integer_form(packed, fmt)
    per = lay.values // lay.subblock
    v = (f.d[..., None, None].double() * f.scale[..., None].double()
         * f.q.reshape(5, 2, per, lay.subblock).double())
    if f.min is not None:
        v = v - (f.dmin[..., None] * f.min).double()[..., None]
    if f.m is not None:
        v = v + f.m.double()[..., None, None]
    w = layouts.dequantize(packed, fmt)
    assert torch.allclose(v.reshape(5, -1), w.double(), rtol=1e-6, atol=1e-6 * w.abs().max().item())
    assert int(f.q.min()) >= -128 and int(f.q.max()) <= 255


@needs_kernel
@pytest.mark.parametrize("fmt", TYPES)
def test_cpp_dequantizer_gives_the_bits_of_layouts(fmt):
    """The pre-fill pass: fp32 tiles are layouts.dequantize bit for bit (and so gguf's); bf16 tiles those values
    rounded to nearest even, on every bf16 path this CPU has."""
    lay = layouts.layout(fmt)
    g = torch.Generator().manual_seed(11)
    blocks = [layouts.random_blocks(29, 3 * lay.values, fmt, g, scale=s) for s in (1e-2, 1e3)]
    blocks += [b for name, b in edge_blocks(fmt).items() if "random" in name or "all ones" in name]
    isas = ["avx2"] + (["avx512bf16"] if qk.native_module() and _has_bf16() else [])
    for packed in blocks:
        rows = packed.shape[0]
        want = layouts.dequantize(packed, fmt, (rows, 3 * lay.values))
        out = torch.empty(rows, 3 * lay.values)
        assert qk.dequantize_into(packed, fmt, out) is out
        assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())
        for isa in isas:
            ob = torch.empty(rows, 3 * lay.values, dtype=torch.bfloat16)
            qk.dequantize_into(packed, fmt, ob, isa=isa)
            wb = want.to(torch.bfloat16)
            assert torch.equal(ob.nan_to_num(), wb.nan_to_num()) and torch.equal(ob.isnan(), wb.isnan()), isa


def _has_bf16() -> bool:
    try:
        qk.native_module().dequantize_into(torch.zeros(1, 34, dtype=torch.uint8), 0,
                                           torch.empty(1, 32, dtype=torch.bfloat16), 2)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("fmt", NEW)
def test_shapes_are_checked_by_name(fmt):
    lay = layouts.layout(fmt)
    with pytest.raises(ValueError, match=f"multiple of {lay.values}"):
        layouts.packed_shape((4, lay.values + 16), fmt)
    with pytest.raises(ValueError, match="does not hold"):
        QuantizedTensor(torch.zeros(4, lay.bytes, dtype=torch.uint8), fmt, (4, 2 * lay.values))
    qt = QuantizedTensor(torch.zeros(4, lay.bytes, dtype=torch.uint8), fmt, (4, lay.values))
    assert qt.dequantize().shape == (4, lay.values)
    with pytest.raises(ValueError, match="no quantizer"):
        formats.quantize(torch.randn(4, lay.values), fmt)
    with pytest.raises(ValueError, match="unknown quantized format 'q7_K'"):
        layouts.packed_shape((4, 256), "q7_K")
    if qk.kernel_available():
        with pytest.raises(RuntimeError, match=f"{fmt} blocks of"):
            qk.native_module().dequantize_into(torch.zeros(4, lay.bytes + 1, dtype=torch.uint8), qk.FMT_CODES[fmt],
                                               torch.empty(4, lay.values), 0)
