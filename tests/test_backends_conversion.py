"""The conversion pass (backends/conversion.py): the one code that changes a model's modules, from the blocks a
loader read or float weights quantized now, run again to move a model; and the engine, which runs the model as
the pass left it."""

import pytest
import torch

from sirocco import backends
from sirocco.backends.moe import StackedExperts
from sirocco.backends.quant import empty_blocks
from sirocco.backends.quant.linear import QuantLinear
from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import Attention, Transformer, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def modules_of(model):
    return [(name, type(m), id(m)) for name, m in model.named_modules()]


def test_the_engine_runs_the_model_as_the_pass_left_it():
    model = build_model(preset("tiny", vocab_size=64), seed=0)
    conversion = backends.attach(model, "torch", prefill="dense")
    assert (conversion.backend, conversion.prefill, conversion.quantized) == ("torch", "dense", None)
    before = modules_of(model)
    ops = [m.ops for m in model.modules() if isinstance(m, Attention)]
    engine = Engine(model, None, max_rows=2, max_seq_len=32)
    assert (engine.backend, engine.attention) == ("torch", "dense")
    engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3))
    assert modules_of(model) == before
    assert all(a is b for a, b in zip(ops, [m.ops for m in model.modules() if isinstance(m, Attention)], strict=True))


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_a_loaders_blocks_become_quant_linear_over_the_same_memory(name):
    """What a loader hands the pass (float tensors assigned, the linear layers to quantize left on the meta
    device, their blocks by module path) gives the model that quantizing the float one gives, bit for bit, with
    the blocks used where they lie and the same report."""
    model = build_model(preset(name, vocab_size=64), seed=0)
    want = build_model(preset(name, vocab_size=64), seed=0)
    expected = backends.attach(want, "torch", quantize="int4").quantized
    with torch.device("meta"):
        parts = Transformer(model.args)
    blocks = empty_blocks(parts, "int4", "cpu").blocks        # a MoE layer's experts: rows of one buffer
    for path, qt in blocks.items():
        qt.data.copy_(want.get_submodule(path).file_blocks())
    assert blocks.keys() == {path for path, m in want.named_modules() if isinstance(m, QuantLinear)}
    floats = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in blocks}
    parts.load_state_dict(floats, strict=False, assign=True)
    got = backends.attach(parts, "torch", quantize="int4", blocks=blocks).quantized
    assert got is not None and expected is not None
    assert (got.layers, got.kept, got.bytes_before, got.bytes_after) == (
        expected.layers, expected.kept, expected.bytes_before, expected.bytes_after)
    for path, qt in blocks.items():
        assert parts.get_submodule(path).qweight.data_ptr() == qt.data.data_ptr(), path
    a, b = want.state_dict(), parts.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_layer_left_without_weights_is_refused():
    model = build_model(preset("tiny", vocab_size=64), seed=0)
    with torch.device("meta"):
        parts = Transformer(model.args)
    state = {k: v for k, v in model.state_dict().items() if k != "layers.1.attention.wk.weight"}
    parts.load_state_dict(state, strict=False, assign=True)
    with pytest.raises(RuntimeError, match=r"without data .*layers\.1\.attention\.wk\.weight"):
        backends.attach(parts, "torch")


def test_running_the_pass_again_moves_the_model_and_keeps_its_weights():
    model = build_model(preset("tiny-moe", vocab_size=64), seed=0)
    backends.attach(model, "torch", quantize="int8")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kernel = model.layers["0"].feed_forward.experts_kernel
    assert isinstance(kernel, StackedExperts) and kernel.fmt == "q8_0"
    conversion = backends.attach(model, "torch", prefill="dense")
    assert conversion.quantized is None and backends.prefill_of(model) == "dense"
    again = model.layers["0"].feed_forward.experts_kernel
    assert isinstance(again, StackedExperts) and again.w1.data_ptr() == kernel.w1.data_ptr()   # stacked as it was
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.attach(model, "gpu")
