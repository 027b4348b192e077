"""Quantizing while loading (``load(..., quantize=...)``, what every ``--quantize`` does): each linear weight is
quantized as it is read, in pieces, so the float model never exists whole. The result must be the model that
loading in float and then quantizing (``backends.attach(..., quantize=...)``) gives, bit for bit, in both
checkpoint layouts (Hugging Face's permutes wq/wk rows within each head, so a piece must hold whole heads), Mistral
and Mixtral (experts stacked in one buffer per matrix), fp32 and bf16, whole models and pipeline stages."""

import pytest
import torch

from sirocco import backends
from sirocco.backends.quant.linear import QuantLinear
from sirocco.checkpoint import load_model, load_quantized, read
from sirocco.cli import main
from sirocco.pretrained import load

from hf_fixtures import save_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def folders(request, tmp_path_factory):
    """The same random weights in the Hugging Face layout (two safetensors shards) and the consolidated one."""
    root = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(request.param, root / "hf", max_shard_size="40KB")
    assert len(list((root / "hf").glob("*.safetensors"))) > 1
    assert main(["convert", str(root / "hf"), str(root / "consolidated")]) == 0
    return request.param, root


def assert_same_model(want, got):
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, 320, (13,))
    with torch.no_grad():
        assert torch.equal(want(tokens, [13]), got(tokens, [13]))


@pytest.mark.parametrize("layout", ["hf", "consolidated"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [read.QUANTIZE_CHUNK, 1])      # 1: one row (or one head of wq/wk) at a time
def test_quantized_while_loading_equals_quantized_after(folders, monkeypatch, layout, fmt, dtype, chunk):
    kind, root = folders
    monkeypatch.setattr(read, "QUANTIZE_CHUNK", chunk)
    want = load_model(root / layout, dtype=dtype)
    expected = backends.attach(want, "torch", quantize=fmt).quantized
    got, report = load_quantized(root / layout, fmt, dtype=dtype)
    assert_same_model(want, got)
    assert (report.mix, report.layers, report.kept, report.types) == (expected.mix, expected.layers, expected.kept,
                                                                       expected.types)
    assert (report.bytes_before, report.bytes_after) == (expected.bytes_before, expected.bytes_after)
    if kind == "mixtral":                     # the experts' decode kernel reads one stacked buffer per matrix
        for layer in got.layers.values():
            moe = layer.feed_forward
            assert moe.experts_kernel is not None and moe.experts_kernel.fmt == {"int8": "q8_0", "int4": "q4_0"}[fmt]
            stacked = moe.experts_kernel.w1
            assert all(e.w1.qweight.data_ptr() == stacked[i].data_ptr() for i, e in enumerate(moe.experts))


def test_a_pipeline_stage_quantized_while_loading(folders):
    _, root = folders
    want = load_model(root / "hf", layers=[1], embed=False, head=True)
    backends.attach(want, "torch", quantize="int4")
    got = load_model(root / "hf", layers=[1], embed=False, head=True, quantize="int4")
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sirocco-tiny", "sirocco-tiny-moe"])
def test_load_with_quantize_reports_what_it_did(name):
    loaded = load(name, quantize="int8")
    assert loaded.quantized is not None and loaded.quantized.mix == "Q8_0"
    assert loaded.quantized.bytes_after < loaded.quantized.bytes_before / 2
    assert loaded.quantized.layers == sum(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert load(name).quantized is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_experts_are_read_into_one_stack_per_matrix(folders, dtype):
    """A Mixtral layer's float experts are loaded as rows of one tensor per matrix, so that the experts' kernel
    takes them as they are (no copy beside the loaded weights); the values are the checkpoint's."""
    from sirocco.backends.moe import MATRICES, stack
    kind, root = folders
    if kind != "mixtral":
        pytest.skip("dense model")
    model = load_model(root / "consolidated", dtype=dtype)
    hf = load_model(root / "hf", dtype=dtype)
    for layer, other in zip(model.layers.values(), hf.layers.values()):
        for matrix in MATRICES:
            weights = [getattr(e, matrix).weight for e in layer.feed_forward.experts]
            stacked, copied = stack(weights)
            assert not copied and stacked.data_ptr() == weights[0].data_ptr()
            assert all(torch.equal(w, getattr(e, matrix).weight) for w, e in zip(weights, other.feed_forward.experts))


def test_projections_sharing_an_input_run_in_one_kernel_call(folders, monkeypatch):
    """Quantized at load, each attention layer's wq, wk, wv and each dense feed-forward's w1, w3 get one kernel
    call for a decode step (``SharedInputProjections``), with the bits of the separate calls: the same greedy
    tokens and log-probabilities with the fused calls as without. Experts keep qmoe; pre-fill calls one by one."""
    from sirocco.backends.quant.linear import SharedInputProjections
    from sirocco.generate.engine import Engine
    from sirocco.generate.sampling import SamplingParams
    from sirocco.model.transformer import Attention, FeedForward

    kind, root = folders
    model, _ = load_quantized(root / "hf", "q4_0", dtype=torch.float32, device="cpu", progress=False)
    fused = {m: m.projection_kernel for m in model.modules() if isinstance(m, (Attention, FeedForward))
             and m.projection_kernel is not None}
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    dense = [m for m in model.modules() if isinstance(m, FeedForward)] if kind == "mistral" else []
    assert set(fused) == set(attention + dense)
    assert all(isinstance(k, SharedInputProjections) for k in fused.values())
    with torch.inference_mode():
        x = torch.randn(3, attention[0].wq.in_features)
        q, k, v = fused[attention[0]](x)
        assert torch.equal(q, attention[0].wq(x)) and torch.equal(v, attention[0].wv(x))
        assert fused[attention[0]](torch.randn(9, x.shape[1])) is None

    def run():
        engine = Engine(model, None, max_rows=2, max_seq_len=64)
        done = engine.generate([[1, 5, 9, 200], [1, 7]], SamplingParams(max_tokens=6, temperature=0,
                                                                        stop_on_eos=False))
        return [(c.tokens, c.logprobs) for c in done]
    from sirocco.backends.quant import kernels as qk
    calls = []
    many = qk.qlinear_many
    monkeypatch.setattr(qk, "qlinear_many", lambda *a, **kw: calls.append(1) or many(*a, **kw))
    with_fused = run()
    if qk.kernel_available():                  # without the C++ kernels the layers call their linears one by one
        assert len(calls) >= 5 * len(fused)    # every decode step of the 6 tokens, every fused layer
    for m in fused:
        m.projection_kernel = None
    assert run() == with_fused
