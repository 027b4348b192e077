"""QuantLinear against F.linear over its dequantized weight, on every path of its forward."""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sirocco.backends.cpu import kernels as cpu_kernels
from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant import linear as ql
from sirocco.backends.quant.formats import dequantize, quantize

FMTS = ["q8_0", "q4_0"]


def _tol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # the decode kernel quantizes activations to int8 (relative error about 1/254 per element)
    return ref.abs().max().item() * (3e-2 if dtype == torch.bfloat16 else 1.5e-2)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_quant_linear_matches_f_linear_over_dequantized_weight(fmt, dtype, rows, monkeypatch):
    monkeypatch.setattr(ql, "PREFILL_TILE_ROWS", 16)           # several tiles and a partial one (N = 37)
    lin = nn.Linear(96, 37, bias=True)
    q = ql.QuantLinear.from_linear(lin, fmt)
    assert q.qweight.dtype == torch.uint8 and torch.equal(q.qweight, quantize(lin.weight, fmt))
    x = torch.randn(rows, 96).to(dtype)
    w = dequantize(q.qweight, fmt, (37, 96))
    ref = F.linear(x.float(), w, lin.bias.float())
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype and y.shape == (rows, 37)
    assert (y.float() - ref).abs().max().item() <= _tol(ref, dtype)
    if rows > qk.MAX_ROWS:                      # pre-fill: F.linear over the weight in x's dtype, to its rounding
        monkeypatch.setattr(cpu_kernels, "bf16_gemm_is_slow", lambda: False)
        with torch.no_grad():
            y = q(x)
        torch.testing.assert_close(y, F.linear(x, w.to(dtype)) + lin.bias.to(dtype))
        if dtype == torch.bfloat16:             # in fp32 where bf16 products are slow: the fp32 product, rounded
            monkeypatch.setattr(cpu_kernels, "bf16_gemm_is_slow", lambda: True)
            with torch.no_grad():
                y32 = q(x)
            torch.testing.assert_close(y32, (F.linear(x.float(), w).to(dtype) + lin.bias.to(dtype)), atol=0, rtol=0.01)
    elif qk.kernel_available():                 # decode: exactly the kernel
        assert torch.equal(y, qk.qlinear(x, q.qweight, fmt) + lin.bias.to(dtype))


def test_quant_linear_batched_input_grad_and_state_dict():
    lin = nn.Linear(64, 10, bias=False)
    q = ql.QuantLinear.from_linear(lin, "q4_0")
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = q(x)                                    # autograd wanted: dequantize + matmul
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, F.linear(x, q.dequantized_weight()))
    y.sum().backward()
    assert x.grad is not None
    assert set(q.state_dict()) == {"qweight"}
    q2 = ql.QuantLinear(64, 10, "q4_0")
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.qweight, q.qweight) and "fmt=q4_0" in repr(q2)


def test_from_quantized_uses_the_blocks_in_place():
    qt = ql.QuantizedTensor.from_float(torch.randn(5, 32), "q8_0")
    q = ql.QuantLinear.from_quantized(qt)
    assert q.qweight.data_ptr() == qt.data.data_ptr() and q.shape == (5, 32)


def avx512_bf16() -> bool:
    """Whether this CPU runs the AVX512-BF16 pass of dequantize_into (the AVX2 one runs everywhere it is built):
    PyTorch's own reading of the CPU."""
    return torch.cpu._is_avx512_bf16_supported()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_into_gives_the_bits_of_dequantize(fmt, dtype):
    w = torch.randn(37, 96) * torch.logspace(-3, 3, 37)[:, None]       # scales over six decades
    packed = quantize(w, fmt)
    want = dequantize(packed, fmt, (37, 96)).to(dtype)                  # bf16: fp32 values rounded to nearest even
    out = torch.full((37, 96), float("nan"), dtype=dtype)
    assert qk.dequantize_into(packed, fmt, out) is out
    assert torch.equal(out, want)
    if qk.kernel_available():                   # the C++ pass itself, not the fallback, on every path this CPU has
        for isa in ["avx2"] + (["avx512bf16"] if dtype == torch.bfloat16 and avx512_bf16() else []):
            out2 = torch.empty(37, 96, dtype=dtype)
            qk.native_module().dequantize_into(packed, qk.FMT_CODES[fmt], out2, qk.DEQUANT_ISA_CODES[isa])
            assert torch.equal(out2, want), isa


def test_dequantize_into_bf16_rounds_ties_to_even():
    # q8_0 blocks whose fp16 scales (1 + 2^-8, 1 + 3 * 2^-8, ...) times the quants -127..127 land on bf16 ties
    # (the 16 dropped bits exactly 0x8000), with an even and with an odd kept bit, and between them
    d = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2**-14, 1 - 2**-11], dtype=torch.float16)
    q = torch.arange(-127, 129).clamp(max=127).to(torch.int8).reshape(8, 32)
    blocks = torch.cat([d.repeat(2).view(torch.uint8).reshape(8, 2), q.view(torch.uint8)], dim=1)
    packed = blocks.reshape(8, 34)
    want = dequantize(packed, "q8_0", (8, 32))
    bits = want.view(torch.int32)
    ties = (bits & 0xFFFF) == 0x8000
    assert ties.sum() >= 4 and (ties & ((bits >> 16) & 1 == 1)).any() and (ties & ((bits >> 16) & 1 == 0)).any()
    for isa in ["auto"] + (["avx2", "avx512bf16"] if qk.kernel_available() and avx512_bf16() else []):
        out = torch.empty(8, 32, dtype=torch.bfloat16)
        qk.dequantize_into(packed, "q8_0", out, isa=isa)
        assert torch.equal(out, want.to(torch.bfloat16)), isa


def test_prefill_rows_are_rounded_up_to_a_bucket(monkeypatch):
    """QuantLinear's pre-fill tiles multiply rows padded to a multiple of ROW_BUCKET (one compiled kernel of the
    matrix library per bucket, not per row count), and return only the real rows."""
    q = ql.QuantLinear.from_linear(nn.Linear(64, 40, bias=False), "q8_0")
    rows = []
    tiled = ql.QuantLinear._tiled
    monkeypatch.setattr(ql.QuantLinear, "_tiled", lambda self, x: rows.append(x.shape[0]) or tiled(self, x))
    x = torch.randn(45, 64)
    with torch.inference_mode():
        y = q(x)
    assert rows == [64] and y.shape == (45, 40)
    torch.testing.assert_close(y, F.linear(x, q.dequantized_weight()))


def test_prefill_tiles_share_one_scratch_buffer_per_thread():
    # one buffer per thread and dtype, grown to the largest tile asked for; layers of other shapes reuse it and
    # still get their own product
    a = ql.tile_buffer(4, 64, torch.float32)
    b = ql.tile_buffer(2, 96, torch.float32)
    assert b.shape == (2, 96) and b.data_ptr() == a.data_ptr()
    c = ql.tile_buffer(8, 64, torch.float32)
    assert c.shape == (8, 64) and ql.tile_buffer(1, 32, torch.float32).data_ptr() == c.data_ptr()
    other = []
    t = threading.Thread(target=lambda: other.append(ql.tile_buffer(1, 32, torch.float32)))
    t.start()
    t.join()
    assert other[0].data_ptr() != c.data_ptr()
    layers = [ql.QuantLinear.from_linear(nn.Linear(k, n, bias=False), "q8_0") for k, n in ((64, 40), (96, 24))]
    x = [torch.randn(33, 64), torch.randn(33, 96)]
    with torch.no_grad():
        ys = [q(xi) for q, xi in zip(layers, x, strict=True)] + [layers[0](x[0])]
    for y, q, xi in zip(ys, layers + layers[:1], x + x[:1], strict=True):
        torch.testing.assert_close(y, F.linear(xi, dequantize(q.qweight, "q8_0", q.shape)))
