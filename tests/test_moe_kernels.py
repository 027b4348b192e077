"""A MoE layer's experts in one decode call: moe_experts (bf16 / fp32, cpu backend) and qmoe (every GGUF type),
each bit for bit the per-expert path it replaces, each token's bits its own, the stacked storage read in place; the
model generates the same tokens with and without them, a GGUF Mixtral included."""

import os

import pytest
import torch
from torch import nn

from sirocco import backends
from sirocco.backends import moe
from sirocco.backends.cpu import kernels, modules
from sirocco.backends.quant import kernels as qkernels
from sirocco.backends.quant import layouts
from sirocco.backends.quant.convert import deinterleave_weights
from sirocco.backends.quant.formats import QuantizedTensor
from sirocco.backends.quant.linear import QuantLinear
from sirocco.checkpoint import GGUFFile, load_model
from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.config import MoeArgs, preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model
from sirocco.model.transformer import MoeFeedForward
from sirocco.pretrained import BUNDLED

MOE_PATHS = [pytest.param(isa, dtype, id=f"{isa}-{str(dtype)[6:]}") for isa in ("avx512", "avx2")
             for dtype in (torch.float32, torch.bfloat16)
             if isa in kernels.candidate_isas(dtype, "moe")] or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="no moe_experts build for this CPU"))]
needs_quant = pytest.mark.skipif(not qkernels.kernel_available(), reason="no quantized kernel build here")


def _build(isa):
    module = kernels.native_module(isa)
    if module is None:
        pytest.skip(f"the {isa} build is unavailable here")
    return module


def _layer(dtype, num_experts=4, seed=3) -> MoeFeedForward:
    args = preset("tiny-moe", vocab_size=64, moe=MoeArgs(num_experts, 2))
    model = build_model(args, seed=seed).to(dtype)
    return model.layers["0"].feed_forward


class _BuildLinear(nn.Module):
    """A linear layer through one build's small_m_linear (what CpuLinear runs for 1 to 8 rows)."""

    def __init__(self, weight, fn):
        super().__init__()
        self.weight, self.fn = weight, fn

    def forward(self, x):
        return self.fn(x.contiguous(), self.weight)


def _routes(T, E, seed):
    """(T, 2) expert ids: random pairs (repeats across tokens), every token the same pair, or only two experts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    same = torch.tensor([[1, 3]] * T)
    two = torch.tensor([[0, 1] if t % 2 else [1, 0] for t in range(T)])
    return [ids, same, two]


def _weights(T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, 2, generator=g), -1).to(dtype)


@pytest.mark.parametrize("isa,dtype", MOE_PATHS)
def test_moe_experts_equal_the_per_expert_path_bit_for_bit(isa, dtype):
    native = _build(isa)
    layer = _layer(dtype)
    kernel = moe.stack_layer(layer)
    assert kernel is not None and kernel.fmt is None
    for expert in layer.experts:                 # the per-expert path on the same build's linear
        for name in moe.MATRICES:
            setattr(expert, name, _BuildLinear(getattr(expert, name).weight, native.small_m_linear))
    x_all = torch.randn(8, layer.gate.in_features).to(dtype)
    with torch.no_grad():
        for T in range(1, 9):
            x = x_all[:T]
            for r, ids in enumerate(_routes(T, len(layer.experts), seed=T)):
                w = _weights(T, dtype, seed=T + r)
                got = native.moe_experts(x, ids, w, kernel.w1, kernel.w3, kernel.w2)
                want = layer.run_experts(x, ids, w)
                assert torch.equal(got, want), (T, r)
                for t in range(T):               # each token's bits its own
                    alone = native.moe_experts(x[t:t + 1], ids[t:t + 1], w[t:t + 1], kernel.w1, kernel.w3, kernel.w2)
                    assert torch.equal(alone[0], got[t]), (T, r, t)


@pytest.mark.parametrize("isa,dtype", MOE_PATHS)
def test_moe_experts_refuses_bad_input_by_name(isa, dtype):
    native = _build(isa)
    layer = _layer(dtype)
    k = moe.stack_layer(layer)
    x, ids, w = torch.randn(2, 64).to(dtype), torch.tensor([[0, 1], [2, 3]]), _weights(2, dtype, 0)
    with pytest.raises(RuntimeError, match="moe_experts"):
        native.moe_experts(x, ids, w, k.w1, k.w3, k.w1)
    with pytest.raises(RuntimeError, match="out of range"):
        native.moe_experts(x, torch.tensor([[0, 4], [2, 3]]), w, k.w1, k.w3, k.w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attach_stacks_the_experts_and_keeps_names_and_values(dtype):
    args = preset("tiny-moe", vocab_size=64)
    model = build_model(args, seed=5).to(dtype)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    modules.attach(model)
    assert {n: t for n, t in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    for layer in model.layers.values():
        ff = layer.feed_forward
        k = ff.experts_kernel
        assert isinstance(k, moe.StackedExperts) and k.fmt is None
        for name, stack in zip(moe.MATRICES, (k.w1, k.w3, k.w2), strict=True):
            assert stack.shape[0] == len(ff.experts)
            for e, expert in enumerate(ff.experts):     # each expert's weight is its row of the stack, in place
                row = stack.data_ptr() + e * stack.stride(0) * stack.element_size()
                assert getattr(expert, name).weight.data_ptr() == row
    ff = model.layers["0"].feed_forward
    again = moe.stack_layer(ff)                                      # stacked already: taken as it is
    assert again is not None and again.w1.data_ptr() == ff.experts_kernel.w1.data_ptr()
    from sirocco.backends import reference
    reference.attach(model)
    assert all(layer.feed_forward.experts_kernel is None for layer in model.layers.values())


@needs_quant
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"])
def test_qmoe_equals_the_quant_linear_experts_bit_for_bit(fmt, dtype, isa):
    if isa == "avx512vnni" and qkernels.native_module().qlinear_isa() != "avx512vnni":
        pytest.skip("no AVX512-VNNI on this CPU")
    args = preset("tiny-moe", vocab_size=64)
    model = build_model(args, seed=7).to(dtype)
    backends.attach(model, "torch", quantize=fmt)
    if isa == "avx2":               # the pass interleaves the blocks for the VNNI path; AVX2 reads the file's layout
        deinterleave_weights(model)
    layer = model.layers["1"].feed_forward
    layout = layer.experts[0].w1.layout
    k = layer.experts_kernel
    assert isinstance(k, moe.StackedExperts) and k.fmt == fmt
    for name, stack in zip(moe.MATRICES, (k.w1, k.w3, k.w2), strict=True):
        for e, expert in enumerate(layer.experts):
            q = getattr(expert, name)
            assert isinstance(q, QuantLinear)
            assert q.qweight.data_ptr() == stack.data_ptr() + e * stack.stride(0)
    x_all = torch.randn(8, args.dim).to(dtype)
    with torch.no_grad():
        for T in range(1, 9):
            x = x_all[:T]
            for r, ids in enumerate(_routes(T, len(layer.experts), seed=T)):
                w = _weights(T, dtype, seed=T + r)
                got = qkernels.qmoe(x, ids, w, k.w1, k.w3, k.w2, fmt, isa=isa, layout=layout)
                want = layer.run_experts(x, ids, w)
                assert torch.equal(got, want), (T, r)
                for t in range(T):
                    alone = qkernels.qmoe(x[t:t + 1], ids[t:t + 1], w[t:t + 1], k.w1, k.w3, k.w2, fmt, isa=isa,
                                          layout=layout)
                    assert torch.equal(alone[0], got[t]), (T, r, t)


def _gguf_layer(fmt, dtype, seed=3, dim=256, hidden=512, num_experts=4) -> MoeFeedForward:
    """A MoE layer whose experts are QuantLinear over random ``fmt`` blocks (as a GGUF file's tensors give them)."""
    layer = MoeFeedForward(dim, hidden, num_experts, 2).to(dtype)
    g = torch.Generator().manual_seed(seed)
    for expert in layer.experts:
        for name, (n, k) in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden))):
            blocks = layouts.random_blocks(n, k, fmt, g, scale=2e-3)
            setattr(expert, name, QuantLinear.from_quantized(QuantizedTensor(blocks, fmt, (n, k))))
    return layer


QMOE_TYPES = [t for t in layouts.TYPES if t not in ("q8_0", "q4_0")]


@needs_quant
@pytest.mark.parametrize("fmt", QMOE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmoe_of_every_type_equals_the_quant_linear_experts_bit_for_bit(fmt, dtype):
    layer = _gguf_layer(fmt, dtype)
    k = moe.stack_layer(layer)
    assert isinstance(k, moe.StackedExperts) and k.fmt == fmt
    for name, stack in zip(moe.MATRICES, (k.w1, k.w3, k.w2), strict=True):          # each expert's rows read in place
        for e, expert in enumerate(layer.experts):
            assert getattr(expert, name).qweight.data_ptr() == stack.data_ptr() + e * stack.stride(0)
    x_all = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    isas = ["avx2"] + (["avx512vnni"] if qkernels.native_module().qlinear_isa() == "avx512vnni" else [])
    with torch.no_grad():
        for T in (1, 3, 8):
            x = x_all[:T]
            for r, ids in enumerate(_routes(T, len(layer.experts), seed=T)):
                w = _weights(T, dtype, seed=T + r)
                want = layer.run_experts(x, ids, w)
                assert want.abs().max().item() > 0
                for isa in isas:
                    got = qkernels.qmoe(x, ids, w, k.w1, k.w3, k.w2, fmt, isa=isa)
                    assert torch.equal(got, want), (T, r, isa)
                    for t in range(T):
                        alone = qkernels.qmoe(x[t:t + 1], ids[t:t + 1], w[t:t + 1], k.w1, k.w3, k.w2, fmt, isa=isa)
                        assert torch.equal(alone[0], got[t]), (T, r, t, isa)
        # the layer's forward takes the one-call kernel
        layer.experts_kernel = k
        x = x_all[:2]
        chosen, weights = layer.route(x)
        assert torch.equal(layer(x), layer.run_experts(x, chosen, weights))


def _count_calls(monkeypatch):
    calls = {"kernel": 0}
    call = moe.StackedExperts.__call__

    def counting(self, x, chosen, weights):
        out = call(self, x, chosen, weights)
        calls["kernel"] += out is not None
        return out
    monkeypatch.setattr(moe.StackedExperts, "__call__", counting)
    return calls


def _generate(model, backend):
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 6)]
    params = SamplingParams(max_tokens=10)
    backends.attach(model, backend)
    engine = Engine(model, None, max_rows=3, max_seq_len=64)
    return [c.tokens for c in engine.generate(prompts, params)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_generates_the_same_tokens_with_and_without_the_kernel(dtype, monkeypatch):
    if kernels.kernel_isa(dtype, "moe") is None:
        pytest.skip("no moe_experts build for this CPU")
    model = build_model(preset("tiny-moe", vocab_size=64), seed=11).to(dtype)
    calls = _count_calls(monkeypatch)
    fast = _generate(model, "cpu")
    assert calls["kernel"] > 0
    monkeypatch.setattr(moe.StackedExperts, "__call__", lambda self, x, chosen, weights: None)
    plain = _generate(model, "cpu")
    assert fast == plain


@needs_quant
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_gguf_mixtral_runs_its_experts_through_qmoe_in_place(tmp_path, fmt, monkeypatch):
    model = load_model(BUNDLED / "sirocco-tiny-moe")
    backends.attach(model, "torch", quantize=fmt)
    save_gguf(model, tmp_path / "m.gguf", BUNDLED / "sirocco-tiny-moe" / "tokenizer.model")
    g = GGUFFile(tmp_path / "m.gguf")
    back = load_model(g)
    for i, layer in back.layers.items():
        k = layer.feed_forward.experts_kernel
        assert isinstance(k, moe.StackedExperts) and k.fmt == fmt
        stacked = g.tensors[f"blk.{i}.ffn_gate_exps.weight"]
        # the file's stacked blocks, read once (into huge-page memory) and stacked as they are: no copy per expert
        # (interleaved in place where the VNNI path reads that layout: the file's bytes back through file_blocks)
        assert k.w1.data_ptr() == layer.feed_forward.experts[0].w1.qweight.data_ptr()
        in_file = g.header.data[stacked.offset:stacked.offset + stacked.nbytes]
        blocks = torch.cat([expert.w1.file_blocks().flatten() for expert in layer.feed_forward.experts])
        assert torch.equal(blocks, torch.from_numpy(in_file))
    calls = _count_calls(monkeypatch)
    from_file = _generate(back, "torch")
    assert calls["kernel"] > 0
    assert from_file == _generate(model, "torch")


@needs_quant
@pytest.mark.skipif(not os.environ.get("SIROCCO_TEST_VNNI_EMULATION"),
                    reason="set SIROCCO_TEST_VNNI_EMULATION=1 to build (about a minute, once) and check qmoe's VNNI "
                           "path on scalar emulations of its AVX-512 operations")
@pytest.mark.parametrize("fmt", list(layouts.TYPES))
def test_qmoe_vnni_path_on_emulation_equals_the_avx2_path(fmt):
    emulated = qkernels.vnni_emulation_module()
    if fmt in ("q8_0", "q4_0"):
        model = build_model(preset("tiny-moe", vocab_size=64), seed=9)
        backends.attach(model, "torch", quantize=fmt)
        deinterleave_weights(model)                                  # the AVX2 path reads the file's layout
        k = model.layers["0"].feed_forward.experts_kernel
    else:
        k = moe.stack_layer(_gguf_layer(fmt, torch.float32))
    code = qkernels.FMT_CODES[fmt]
    for T in (1, 5, 8):
        x, ids, w = torch.randn(T, k.dim), _routes(T, 4, seed=T)[0], _weights(T, torch.float32, seed=T)
        vnni = emulated.qmoe(x, ids, w, k.w1, k.w3, k.w2, code, qkernels.ISA_CODES["avx512vnni"])
        assert torch.equal(vnni, qkernels.qmoe(x, ids, w, k.w1, k.w3, k.w2, fmt, isa="avx2"))
