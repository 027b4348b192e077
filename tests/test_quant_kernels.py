"""The quantized decode kernel: equal to its scalar definition bit for bit, to the plain PyTorch product over the
dequantized weights to fp32 rounding, and the same bits for a row alone or packed with others."""

import os

import pytest
import torch

from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant.formats import BLOCK, quantize, unpack

needs_kernel = pytest.mark.skipif(not qk.kernel_available(),
                                  reason="the quantized C++ kernels are not built here (no AVX2, or no compiler)")
FMTS = ["q8_0", "q4_0"]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(32 * 3, 13), (32 * 5, 8), (32 * 37, 21)]       # (K, N): K not a multiple of 64 or 256, N odd


def scalar_definition(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """sum over blocks b, in order, of float(int dot_b) * (d_w * d_a), each step rounded to fp32: the kernel's
    definition, computed with exact integer dots and one fp32 operation at a time."""
    qa, da = qk.quantize_activations(x)
    qw, dw = unpack(packed, fmt)                                              # (N, nb, 32), (N, nb)
    qa = qa.reshape(x.shape[0], -1, BLOCK).to(torch.int64)
    dots = (qa[:, None] * qw.to(torch.int64)[None]).sum(-1).to(torch.float32)  # (M, N, nb), exact
    scale = dw[None] * da[:, None]                                            # (M, N, nb)
    acc = torch.zeros(x.shape[0], packed.shape[0])
    for b in range(dots.shape[-1]):
        acc = acc + dots[..., b] * scale[..., b]
    return acc.to(x.dtype)


def _case(k: int, n: int, fmt: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    x = torch.randn(qk.MAX_ROWS, k, generator=g) * 3
    x[1, :BLOCK] = 0                                             # an all-zero activation block
    return quantize(w, fmt), x


def test_activation_quantization_matches_the_kernels():
    x = torch.randn(5, 96) * torch.logspace(-40, 3, 5)[:, None]    # includes blocks too small for a normal scale
    q, d = qk.quantize_activations(x)
    assert q.dtype == torch.int8 and d.shape == (5, 3)
    assert torch.equal(d[0], torch.zeros(3)) and torch.equal(q[0], torch.zeros(96, dtype=torch.int8))
    assert ((q.float().reshape(5, 3, 32) * d[..., None]).reshape(5, 96) - x).abs().max() <= x.abs().max() / 254
    if qk.kernel_available():
        kq, kd = qk.native_module().quantize_activations(x, 32)
        assert torch.equal(kq, q) and torch.equal(kd, d)


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_kernel_is_its_scalar_definition_and_close_to_pytorch(fmt, dtype, k, n):
    packed, x = _case(k, n, fmt, seed=k + n)
    x = x.to(dtype)
    for m in range(1, qk.MAX_ROWS + 1):
        y = qk.qlinear(x[:m], packed, fmt)
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.equal(y, scalar_definition(x[:m], packed, fmt)), m
        ref = qk.qlinear_reference(x[:m], packed, fmt).float()
        tol = 2e-6 * (k ** 0.5) * ref.abs().max().item() + 1e-30
        if dtype == torch.bfloat16:                    # both round an fp32 sum to bf16: one bf16 step apart
            tol += ref.abs().max().item() / 128
        assert (y.float() - ref).abs().max().item() <= tol, m


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_bits_do_not_depend_on_other_rows_or_threads(fmt, dtype):
    packed, x = _case(32 * 37, 21, fmt, seed=5)
    x = x.to(dtype)
    alone = torch.cat([qk.qlinear(x[i:i + 1], packed, fmt) for i in range(len(x))])
    for m in range(2, qk.MAX_ROWS + 1):
        assert torch.equal(qk.qlinear(x[:m], packed, fmt), alone[:m]), m
    assert torch.equal(qk.qlinear(x[3:7], packed, fmt), alone[3:7])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(qk.qlinear(x, packed, fmt), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_activation_quantization_ties_signs_and_scales_match_bit_for_bit():
    """The kernel's vector quantization against the Python mirror on blocks built to hit its edges: exact ties
    (x / d = k + 1/2, either sign), the block maximum itself, negative zero, a block of the largest floats, one at
    the smallest scale that is still normal, and random blocks of every magnitude."""
    ties = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5, -0.0, 1.5, -1.5, 3.49999, -3.50001] + [0.0] * 20)
    huge = torch.full((32,), torch.finfo(torch.float32).max) * torch.tensor([1.0, -1.0] * 16)
    smallest = torch.full((32,), 127 * torch.finfo(torch.float32).tiny) * torch.linspace(-1, 1, 32)
    g = torch.Generator().manual_seed(5)
    rand = torch.randn(40, 32, generator=g) * torch.logspace(-30, 30, 40)[:, None]
    x = torch.cat([ties[None], huge[None], smallest[None], rand]).reshape(1, -1)
    q, d = qk.quantize_activations(x)
    kq, kd = qk.native_module().quantize_activations(x, 32)
    assert torch.equal(kq, q) and torch.equal(kd, d)
    assert q[0, :12].tolist() == [127, 3, -3, 1, -1, 127, -127, 0, 2, -2, 3, -4]


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
def test_avx2_and_vnni_paths_agree(fmt):
    packed, x = _case(32 * 5, 19, fmt, seed=9)
    avx2 = qk.qlinear(x, packed, fmt, isa="avx2")
    assert torch.equal(avx2, scalar_definition(x, packed, fmt))
    if qk.native_module().qlinear_isa() != "avx512vnni":
        pytest.skip("no AVX512-VNNI on this CPU: only the AVX2 path runs (the VNNI one is compiled, not run)")
    assert torch.equal(qk.qlinear(x, packed, fmt, isa="avx512vnni"), avx2)


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_sharing_an_input_in_one_call_get_the_bits_of_separate_calls(fmt, dtype):
    # wq, wk, wv (or w1, w3) in one call: one quantization of the rows, one parallel region over every weight's
    # tiles; sizes with a partial last tile, so tiles of two weights meet inside a thread's share
    k = 32 * 5
    weights = [_case(k, n, fmt, seed=n)[0] for n in (13, 8, 21)]
    x = _case(k, 1, fmt, seed=3)[1].to(dtype)
    isas = ["avx2"] + (["avx512vnni"] if qk.native_module().qlinear_isa() == "avx512vnni" else [])
    for isa in isas:
        for m in range(1, qk.MAX_ROWS + 1):
            ys = qk.qlinear_many(x[:m], weights, fmt, isa=isa)
            assert ys is not None and len(ys) == 3
            for y, w in zip(ys, weights, strict=True):
                assert y.dtype == dtype and torch.equal(y, qk.qlinear(x[:m], w, fmt, isa=isa)), (isa, m)
    with pytest.raises(RuntimeError, match="does not match"):
        qk.qlinear_many(x[:1], [weights[0], quantize(torch.randn(4, 64), fmt)], fmt)
    assert qk.qlinear_many(torch.cat([x, x]), weights, fmt) is None          # 16 rows: not a decode step


@needs_kernel
@pytest.mark.skipif(not os.environ.get("SIROCCO_TEST_VNNI_EMULATION"),
                    reason="set SIROCCO_TEST_VNNI_EMULATION=1 to build (about a minute, once) and check the VNNI "
                           "tile on scalar emulations of its AVX-512 operations")
@pytest.mark.parametrize("fmt", FMTS)
def test_vnni_tile_on_emulated_instructions_gives_the_avx2_bits(fmt):
    emulated = qk.vnni_emulation_module()
    assert emulated.qlinear_isa() == "avx512vnni"
    for k, n in [(32 * 5, 19), (32 * 4, 8), (32, 3), (32 * 37, 21)]:      # odd and even block counts, a lone block
        packed, x = _case(k, n, fmt, seed=k)
        x[2, 5] = -x[2].abs().max()                                     # an activation at -127
        if fmt == "q8_0":
            packed.view(-1)[2 + 34 * 0] = 0x80                          # a weight of -128 (no quantizer writes it)
        for m in range(1, qk.MAX_ROWS + 1):
            avx2 = qk.qlinear(x[:m], packed, fmt, isa="avx2")
            assert torch.equal(avx2, scalar_definition(x[:m], packed, fmt)), (k, m)
            assert torch.equal(emulated.qlinear(x[:m], packed, qk.FMT_CODES[fmt], 2), avx2), (k, m)


@needs_kernel
def test_kernel_refuses_wrong_shapes():
    packed = quantize(torch.randn(4, 64), "q8_0")
    with pytest.raises(ValueError, match="do not match"):
        qk.qlinear(torch.randn(1, 96), packed, "q8_0")
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        qk.native_module().qlinear(torch.randn(9, 64), packed, 0, 0)


@pytest.mark.parametrize("fmt", FMTS)
def test_fallback_paths(fmt, monkeypatch):
    """Where no kernel is built (and for more than 8 rows) qlinear is the plain PyTorch product."""
    packed, x = _case(32 * 3, 7, fmt, seed=1)
    exact = scalar_definition(x, packed, fmt)
    ref = qk.qlinear_reference(x, packed, fmt)
    torch.testing.assert_close(ref, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    monkeypatch.setattr(qk, "native_module", lambda: None)
    assert torch.equal(qk.qlinear(x, packed, fmt), ref)
    many = torch.cat([x, x])
    assert torch.equal(qk.qlinear(many, packed, fmt), qk.qlinear_reference(many, packed, fmt))
    assert qk.qlinear(x.to(torch.bfloat16), packed, fmt).dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_rows_are_their_fp32_values_and_the_output_rounded_once(fmt, rows):
    """bf16 rows go into the kernel as they are and come out as bf16: exactly the fp32 call on their values with
    its result rounded to nearest even, for every ISA path this CPU has."""
    packed, x = _case(32 * 7, 19, fmt, seed=3)
    xb = x[:rows].to(torch.bfloat16)
    for isa in ["avx2"] + (["avx512vnni"] if qk.native_module().qlinear_isa() == "avx512vnni" else []):
        got = qk.qlinear(xb, packed, fmt, isa=isa)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, qk.qlinear(xb.float(), packed, fmt, isa=isa).to(torch.bfloat16)), isa
