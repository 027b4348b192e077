"""QuantLinear against F.linear over its dequantized weight, on every path of its forward."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sirocco.backends.cpu.kernels import bf16_gemm_is_slow
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
    if rows > qk.MAX_ROWS:                      # pre-fill: F.linear over the weight in x's dtype, to its rounding,
        # or bf16 rows as an fp32 product rounded once where PyTorch's bf16 product is slow
        upcast = dtype == torch.bfloat16 and bf16_gemm_is_slow()
        want = F.linear(x.float(), w).to(dtype) if upcast else F.linear(x, w.to(dtype))
        torch.testing.assert_close(y, want + lin.bias.to(dtype))
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
