"""The compiled single-row kernel: same products as F.linear, and no compile inside the decode loop."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from sirocco import kernels
from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model


@pytest.mark.parametrize("k", [96, 5 * kernels.CHUNK], ids=["short", "chunked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_row_linear_matches_f_linear(dtype, tol, k):
    assert kernels._chunked(k) == (k > 96)
    x, w = torch.randn(1, k, dtype=dtype), torch.randn(40, k, dtype=dtype)
    scale = (k / 96) ** 0.5                      # sums of k products: the error grows with sqrt(k)
    torch.testing.assert_close(kernels.row_linear(x, w), F.linear(x, w), atol=tol * scale, rtol=tol)


def test_fast_decode_engine_same_tokens_and_no_recompile():
    args = preset("tiny", vocab_size=300, sliding_window=6)
    model = build_model(args, seed=31)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (9, 4)]
    params = SamplingParams(max_tokens=12)
    plain = Engine(model, None, max_rows=2, max_seq_len=64, fast_decode=False).generate([prompts[0]], params)
    fast_engine = Engine(model, None, max_rows=2, max_seq_len=64, fast_decode=True)   # swaps and warms up
    assert any(isinstance(m, kernels.DecodeLinear) for m in model.modules())
    # prompts[0] alone decodes one row at a time through the compiled kernel; the pair uses F.linear.
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast = fast_engine.generate([prompts[0]], params)
        fast_engine.generate(prompts, params)
    assert fast[0].tokens == plain[0].tokens
    torch.testing.assert_close(torch.tensor(fast[0].logprobs), torch.tensor(plain[0].logprobs), atol=1e-4, rtol=0)
    assert set(model.state_dict()) == set(build_model(args).state_dict())
