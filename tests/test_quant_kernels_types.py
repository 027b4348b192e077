"""The decode kernels of every GGUF type of layouts.py (csrc/qlinear.cpp, csrc/qlinear_k.cpp): each output is its
definition bit for bit (integer dots, then the fp32 steps in the documented order, written here in plain PyTorch
over layouts.integer_form and kernels.quantize_activations), close to the plain product over the dequantized
weights, and the same bits for a row alone or packed with others; on the AVX2 path, the AVX512-VNNI one where the
CPU has it, and the VNNI one on scalar emulations of its instructions where asked."""

import os

import pytest
import torch
import torch.nn.functional as F

from sirocco.backends.cpu import kernels as cpu_kernels
from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant import layouts
from sirocco.backends.quant import linear as ql
from sirocco.backends.quant.formats import QuantizedTensor

needs_kernel = pytest.mark.skipif(not qk.kernel_available(),
                                  reason="the quantized C++ kernels are not built here (no AVX2, or no compiler)")
TYPES = list(layouts.TYPES)
NEW = [t for t in TYPES if t not in ("q8_0", "q4_0")]
DTYPES = [torch.float32, torch.bfloat16]


def isas() -> list[str]:
    return ["avx2"] + (["avx512vnni"] if qk.native_module().qlinear_isa() == "avx512vnni" else [])


def definition(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """The kernels' arithmetic over the integer form: per block (or super-block) b in order,

        acc = acc + (float(I_b) * (d_w * d_a)  [- float(Mn_b) * (dmin_w * d_a)]  [+ m_w * (d_a * float(S_b))])

    I_b = sum over sub-blocks of scale * (q . a) exact, Mn_b = sum over sub-blocks of min * (sum of a), S_b the
    activation block's sum; each product and sum rounded to fp32 once."""
    lay = layouts.layout(fmt)
    block = qk.activation_block(fmt)
    qa, da = qk.quantize_activations(x, block)
    m, _k = x.shape
    f = layouts.integer_form(packed, fmt)                              # q (N, nb, values)
    n, nb = f.d.shape
    per = lay.values // lay.subblock
    qa = qa.reshape(m, nb, per, lay.subblock).to(torch.int64)
    q = f.q.reshape(n, nb, per, lay.subblock).to(torch.int64)
    isum = ((qa[:, None] * q[None]).sum(-1) * f.scale.to(torch.int64)[None]).sum(-1)     # (M, N, nb)
    asum = qa.sum(-1)                                                  # (M, nb, per)
    acc = torch.zeros(m, n)
    for b in range(nb):
        p = isum[..., b].to(torch.float32) * (f.d[None, :, b] * da[:, None, b])
        if f.min is not None and f.dmin is not None:
            msum = (asum[:, None, b] * f.min[None, :, b].to(torch.int64)).sum(-1)
            p = p - msum.to(torch.float32) * (f.dmin[None, :, b] * da[:, None, b])
        if f.m is not None:
            p = p + f.m[None, :, b] * (da[:, b] * asum[:, b, 0].to(torch.float32))[:, None]
        acc = acc + p
    return acc.to(x.dtype)


def magnitude(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """(M, N): the sum of |term| over the products the kernel adds (weights as |d scale q| + |dmin min| + |m|),
    the scale its rounding error is relative to."""
    lay = layouts.layout(fmt)
    f = layouts.integer_form(packed, fmt)
    n, nb = f.d.shape
    per = lay.values // lay.subblock
    w = (f.d[..., None, None] * f.scale[..., None] * f.q.reshape(n, nb, per, lay.subblock)).abs()
    if f.min is not None and f.dmin is not None:
        w = w + (f.dmin[..., None] * f.min).abs()[..., None]
    if f.m is not None:
        w = w + f.m.abs()[..., None, None]
    block = qk.activation_block(fmt)
    qa, da = qk.quantize_activations(x, block)
    xa = (qa.float().reshape(x.shape[0], -1, block) * da[..., None]).reshape(x.shape)
    return xa.abs() @ w.reshape(n, -1).T


def shapes(fmt: str) -> list[tuple[int, int]]:
    """(K, N): odd block counts, a lone block, N not a multiple of the tiles' 8 or 16 rows."""
    v = layouts.block_values(fmt)
    return [(v, 13), (3 * v, 21), (4 * v, 16)] if v == 256 else [(32, 3), (32 * 5, 19), (32 * 37, 21)]


def case(k: int, n: int, fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = layouts.random_blocks(n, k, fmt, g)
    x = torch.randn(qk.MAX_ROWS, k, generator=g) * 3
    x[1, :256] = 0                                  # an all-zero activation block
    x[2, 5] = -x[2].abs().max()                     # an activation at -127
    return packed, x


def test_activation_quantization_in_blocks_of_256_matches_the_kernels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 768, generator=g) * torch.logspace(-40, 30, 6)[:, None]   # scales too small to be normal
    x[2, 256:512] = 0
    x[3, :256] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -0.0] + [1.5] * 249)   # ties at d = 1
    q, d = qk.quantize_activations(x, 256)
    assert q.shape == (6, 768) and d.shape == (6, 3)
    assert torch.equal(d[0], torch.zeros(3)) and torch.equal(q[2, 256:512], torch.zeros(256, dtype=torch.int8))
    assert q[3, :7].tolist() == [127, 3, -3, 1, -1, 127, 0]
    if qk.kernel_available():
        kq, kd = qk.native_module().quantize_activations(x, 256)
        assert torch.equal(kq, q) and torch.equal(kd, d)
    with pytest.raises(ValueError, match="multiple of 256"):
        qk.quantize_activations(torch.randn(2, 288), 256)


@needs_kernel
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_is_its_definition_and_close_to_the_dequantized_product(fmt, dtype):
    for k, n in shapes(fmt):
        packed, x = case(k, n, fmt, seed=k + n)
        x = x.to(dtype)
        for m in range(1, qk.MAX_ROWS + 1):
            want = definition(x[:m], packed, fmt)
            for isa in isas():
                y = qk.qlinear(x[:m], packed, fmt, isa=isa)
                assert y.dtype == dtype and y.shape == (m, n)
                assert torch.equal(y, want), (k, n, m, isa)
            ref = qk.qlinear_reference(x[:m], packed, fmt).float()
            tol = 2e-6 * (k ** 0.5) * magnitude(x[:m], packed, fmt) + 1e-30
            if dtype == torch.bfloat16:                # both round an fp32 sum to bf16: one bf16 step apart
                tol = tol + ref.abs() / 128
            assert ((want.float() - ref).abs() <= tol).all(), (k, n, m)


def edge_blocks(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """16 rows of two blocks each: every byte 0xFF, 0x00, 0x55 or 0xAA (every quant and integer scale at its largest,
    smallest, alternating), each fp16 factor 255.9, the smallest subnormal, 0 or -0.5; and activations (5, K) with
    a zero row and a zero block."""
    lay = layouts.layout(fmt)
    k = 2 * lay.values
    rows = []
    for byte in (0xFF, 0x00, 0x55, 0xAA):
        for half in (0x5BFF, 0x0001, 0x0000, 0xB800):          # 255.9, the smallest subnormal, 0, -0.5
            b = torch.full((1, k // lay.values * lay.bytes), byte, dtype=torch.uint8).reshape(-1, lay.bytes)
            for at in lay.fp16_fields:
                b[:, at], b[:, at + 1] = half & 0xFF, half >> 8
            rows.append(b.reshape(1, -1))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    x[0] = 0
    x[3, : lay.values] = 0
    return torch.cat(rows), x


@needs_kernel
@pytest.mark.parametrize("fmt", NEW)
def test_kernel_on_edge_blocks(fmt):
    """Every quant and integer scale at its largest (all bits set), at its smallest (all clear), in alternating
    patterns; the weights' fp16 scales large, tiny (subnormal) and zero; against activations with zero blocks."""
    packed, x = edge_blocks(fmt)
    for isa in isas():
        for m in (1, 2, 5):
            assert torch.equal(qk.qlinear(x[:m], packed, fmt, isa=isa), definition(x[:m], packed, fmt)), (isa, m)


@needs_kernel
@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_bits_do_not_depend_on_other_rows_or_threads(fmt, dtype):
    k, n = shapes(fmt)[1]
    packed, x = case(k, n, fmt, seed=5)
    x = x.to(dtype)
    for isa in isas():
        alone = torch.cat([qk.qlinear(x[i:i + 1], packed, fmt, isa=isa) for i in range(len(x))])
        for m in range(2, qk.MAX_ROWS + 1):
            assert torch.equal(qk.qlinear(x[:m], packed, fmt, isa=isa), alone[:m]), (isa, m)
        assert torch.equal(qk.qlinear(x[3:7], packed, fmt, isa=isa), alone[3:7])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(qk.qlinear(x, packed, fmt, isa=isa), alone)
        finally:
            torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("fmt", NEW)
def test_weights_sharing_an_input_in_one_call_get_the_bits_of_separate_calls(fmt):
    k = shapes(fmt)[1][0]
    g = torch.Generator().manual_seed(8)
    weights = [layouts.random_blocks(n, k, fmt, g) for n in (13, 8, 21)]
    x = torch.randn(qk.MAX_ROWS, k, generator=g).to(torch.bfloat16)
    for isa in isas():
        for m in (1, 3, 8):
            ys = qk.qlinear_many(x[:m], weights, fmt, isa=isa)
            assert ys is not None and len(ys) == 3
            for y, w in zip(ys, weights, strict=True):
                assert torch.equal(y, qk.qlinear(x[:m], w, fmt, isa=isa)), (isa, m)


@needs_kernel
@pytest.mark.parametrize("fmt", NEW)
def test_kernel_refuses_wrong_shapes(fmt):
    lay = layouts.layout(fmt)
    packed = layouts.random_blocks(4, 2 * lay.values, fmt, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not match"):
        qk.qlinear(torch.randn(1, 3 * lay.values), packed, fmt)
    if lay.values == 256:                       # K = 288: a multiple of 32, not of 256
        with pytest.raises(RuntimeError, match="K a multiple of 256"):
            qk.native_module().qlinear(torch.randn(1, 288), torch.zeros(4, 144, dtype=torch.uint8),
                                       qk.FMT_CODES[fmt], 0)
    with pytest.raises(RuntimeError, match="unknown format code"):
        qk.native_module().qlinear(torch.randn(1, 256), torch.zeros(4, 144, dtype=torch.uint8), 12, 0)


@pytest.mark.parametrize("fmt", NEW)
def test_fallback_is_the_plain_product(fmt, monkeypatch):
    """Where no kernel is built (and for more than 8 rows) qlinear is the plain PyTorch product."""
    k, n = shapes(fmt)[1]
    packed, x = case(k, n, fmt, seed=2)
    monkeypatch.setattr(qk, "native_module", lambda: None)
    ref = qk.qlinear_reference(x, packed, fmt)
    assert torch.equal(qk.qlinear(x, packed, fmt), ref)
    torch.testing.assert_close(ref, definition(x, packed, fmt), rtol=1e-5,
                               atol=1e-5 * magnitude(x, packed, fmt).max().item())


@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_quant_linear_of_a_gguf_tensor(fmt, dtype, rows, monkeypatch):
    """QuantLinear over blocks of any type (as a GGUF tensor gives them): decode is the kernel, pre-fill F.linear
    over the weight dequantized tile by tile (several tiles and a partial one)."""
    monkeypatch.setattr(ql, "PREFILL_TILE_ROWS", 16)
    k, n = shapes(fmt)[1][0], 37
    packed = layouts.random_blocks(n, k, fmt, torch.Generator().manual_seed(6))
    layer = ql.QuantLinear.from_quantized(QuantizedTensor(packed, fmt, (n, k)))
    w = layouts.dequantize(packed, fmt, (n, k))
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(rows, k).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, n)
    if rows <= qk.MAX_ROWS:
        assert torch.equal(y, qk.qlinear(x, packed, fmt))
    else:
        monkeypatch.setattr(cpu_kernels, "bf16_gemm_is_slow", lambda: False)
        with torch.no_grad():
            y = layer(x)
        # F.linear over tiles against over the whole weight: the same products, summed in another order
        scale = (x.float().abs() @ w.abs().T).max().item()
        torch.testing.assert_close(y, F.linear(x, w.to(dtype)), rtol=1e-5, atol=4e-6 * scale)


@needs_kernel
@pytest.mark.skipif(not os.environ.get("SIROCCO_TEST_VNNI_EMULATION"),
                    reason="set SIROCCO_TEST_VNNI_EMULATION=1 to build (a few minutes, once) and check the VNNI "
                           "tiles on scalar emulations of their AVX-512 operations")
@pytest.mark.parametrize("fmt", NEW)
def test_vnni_tiles_on_emulated_instructions_are_the_definition(fmt):
    emulated = qk.vnni_emulation_module()
    assert emulated.qlinear_isa() == "avx512vnni"
    for k, n in shapes(fmt)[:2]:
        packed, x = case(k, n, fmt, seed=k)
        for m in (1, 2, 3, 8):
            want = definition(x[:m], packed, fmt)
            assert torch.equal(emulated.qlinear(x[:m], packed, qk.FMT_CODES[fmt], 2), want), (k, m)
