"""The interleaved layout of quantized weights (quant/interleave.py) and what reads it: a rearrangement of the file's
bytes that ``deinterleave`` undoes (each part placed as the module docstring says, checked byte by byte and bit by
bit here), the decode tiles over it (csrc/qlinear_x16.cpp: every output its definition bit for bit, over
layouts.integer_form as test_quant_kernels_types.py writes it, and the bits of a row alone), qmoe and pre-fill's
dequantization over it, and the conversion pass, which interleaves a model's blocks in place: the same logits and
tokens, while the state dict, the GGUF writer and ``dequantized_weight`` get the file's blocks
(``QuantLinear.file_blocks``)."""

import os

import pytest
import torch

from sirocco import backends
from sirocco.backends import moe
from sirocco.backends.quant import interleave as il
from sirocco.backends.quant import kernels as qk
from sirocco.backends.quant import layouts
from sirocco.backends.quant import linear as ql
from sirocco.backends.quant.convert import deinterleave_weights, interleave_weights
from sirocco.backends.quant.formats import QuantizedTensor
from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import build_model
from sirocco.model.transformer import MoeFeedForward
from sirocco.pretrained import BUNDLED
from test_quant_kernels_types import case, definition, edge_blocks

TYPES = list(layouts.TYPES)
DTYPES = [torch.float32, torch.bfloat16]
needs_vnni = pytest.mark.skipif(not qk.kernel_available() or qk.native_module().qlinear_isa() != "avx512vnni",
                                reason="the interleaved tiles run on the AVX512-VNNI path (no such CPU here)")


def blocks(rows: int, fmt: str, nb: int = 3, seed: int = 0) -> torch.Tensor:
    return layouts.random_blocks(rows, nb * layouts.block_values(fmt), fmt, torch.Generator().manual_seed(seed))


def shapes(fmt: str) -> list[tuple[int, int]]:
    """(K, N): a lone block, odd block counts, N of one to three groups of 16."""
    v = layouts.block_values(fmt)
    return [(v, 16), (3 * v, 32), (4 * v, 48)] if v == 256 else [(32, 16), (32 * 5, 32), (32 * 37, 48)]


# -- the layout --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", TYPES)
def test_interleaving_is_undone_in_place_band_by_band_and_matrix_by_matrix(fmt):
    packed = blocks(64, fmt)
    inter = il.interleave(packed, fmt)
    assert inter.shape == packed.shape and inter.dtype == torch.uint8 and not torch.equal(inter, packed)
    assert torch.equal(il.deinterleave(inter, fmt), packed)
    work = packed.clone()
    assert il.interleave_(work, fmt, rows=32) is work and torch.equal(work, inter)    # two bands of 32 rows
    il.deinterleave_(work, fmt, rows=16)
    assert torch.equal(work, packed)
    # a MoE stack (E, N, bytes), every expert by itself, also as a strided view of a larger buffer
    stack = torch.stack([blocks(16, fmt, seed=e) for e in range(3)])
    big = torch.zeros(3, 20, stack.shape[-1], dtype=torch.uint8)
    big[:, :16] = stack
    view = big[:, :16]
    il.interleave_(view, fmt)
    for e in range(3):
        assert torch.equal(view[e], il.interleave(stack[e], fmt))
    assert torch.equal(big[:, 16:], torch.zeros_like(big[:, 16:]))


@pytest.mark.parametrize("fmt", TYPES)
def test_interleaving_refuses_what_it_cannot_hold(fmt):
    assert il.interleavable((32, 8), fmt) and not il.interleavable((24, 8), fmt) and not il.interleavable((0, 8), fmt)
    with pytest.raises(ValueError, match="multiple of 16"):
        il.interleave(blocks(24, fmt), fmt)
    with pytest.raises(ValueError, match="uint8"):
        il.interleave(blocks(16, fmt).to(torch.int16), fmt)


def _byte(inter: torch.Tensor, fmt: str, group: int, block: int, at: int) -> int:
    """Byte ``at`` of group ``group``'s block ``block`` in an interleaved (N, nb * bytes) tensor."""
    lay = layouts.layout(fmt)
    nb = inter.shape[1] // lay.bytes
    return int(inter.reshape(-1)[(group * nb + block) * 16 * lay.bytes + at])


def _mask_bit(inter, fmt, group, block, at, j, bit):
    """Bit ``bit`` of the 64-bit mask j at byte ``at`` of a group's block."""
    return (_byte(inter, fmt, group, block, at + 8 * j + bit // 8) >> (bit % 8)) & 1


def test_each_part_sits_where_the_docstring_puts_it():
    g = torch.Generator().manual_seed(5)
    # q8_0: d of row 3 at 2 * 3; quant byte 4k + i of row r at 32 + 64k + 4r + i, its sign bit flipped
    p = layouts.random_blocks(32, 64, "q8_0", g)
    x = il.interleave(p, "q8_0")
    for r, k, i in ((3, 0, 0), (15, 7, 3), (9, 4, 1)):
        assert _byte(x, "q8_0", 1, 1, 2 * r) == int(p[16 + r, 34 + 0])
        assert _byte(x, "q8_0", 1, 1, 32 + 64 * k + 4 * r + i) == int(p[16 + r, 34 + 2 + 4 * k + i]) ^ 0x80
    # q5_1: d 0, m 32, masks at 64 (mask j bit 4r + i = fifth bit of element 4j + i), nibbles at 128
    p = layouts.random_blocks(16, 32, "q5_1", g)
    x = il.interleave(p, "q5_1")
    qh = int.from_bytes(bytes(p[7, 4:8].tolist()), "little")
    for j, i in ((0, 0), (5, 2), (7, 3)):
        assert _mask_bit(x, "q5_1", 0, 0, 64, j, 4 * 7 + i) == (qh >> (4 * j + i)) & 1
    assert _byte(x, "q5_1", 0, 0, 32 + 2 * 7 + 1) == int(p[7, 3])
    assert _byte(x, "q5_1", 0, 0, 128 + 64 * 2 + 4 * 7 + 1) == int(p[7, 8 + 4 * 2 + 1])
    # q5_K: masks at 256, mask 16c + 2t + h bit 4r + i = bit 2c + h of qh byte 4t + i (qh at 16 in the file)
    p = layouts.random_blocks(16, 256, "q5_K", g)
    x = il.interleave(p, "q5_K")
    for c, t, h, r, i in ((0, 0, 0, 0, 0), (3, 7, 1, 15, 3), (2, 5, 0, 6, 1)):
        want = (int(p[r, 16 + 4 * t + i]) >> (2 * c + h)) & 1
        assert _mask_bit(x, "q5_K", 0, 0, 256, 16 * c + 2 * t + h, 4 * r + i) == want
    # q3_K: masks at 224, mask 32h + 4u + t bit 4r + i = bit 4h + t of hmask byte 4u + i; scales' words at 32
    p = layouts.random_blocks(16, 256, "q3_K", g)
    x = il.interleave(p, "q3_K")
    for h, u, t, r, i in ((0, 0, 0, 0, 0), (1, 7, 3, 15, 3), (1, 2, 1, 4, 2)):
        want = (int(p[r, 4 * u + i]) >> (4 * h + t)) & 1
        assert _mask_bit(x, "q3_K", 0, 0, 224, 32 * h + 4 * u + t, 4 * r + i) == want
    assert _byte(x, "q3_K", 0, 0, 32 + 64 * 2 + 4 * 11 + 3) == int(p[11, 96 + 4 * 2 + 3])
    assert _byte(x, "q3_K", 0, 0, 2 * 11) == int(p[11, 108])
    # q6_K: d (at 208 in the file) first, then the scales' words, ql's at 288, qh's at 2336
    p = layouts.random_blocks(32, 512, "q6_K", g)
    x = il.interleave(p, "q6_K")
    assert _byte(x, "q6_K", 1, 1, 2 * 4 + 1) == int(p[20, 210 + 209])
    assert _byte(x, "q6_K", 1, 1, 32 + 64 * 3 + 4 * 4 + 2) == int(p[20, 210 + 192 + 12 + 2])
    assert _byte(x, "q6_K", 1, 1, 288 + 64 * 31 + 4 * 4) == int(p[20, 210 + 124])
    assert _byte(x, "q6_K", 1, 1, 2336 + 64 * 15 + 4 * 4 + 3) == int(p[20, 210 + 128 + 63])


# -- the tiles -----------------------------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interleaved_tiles_are_the_definition(fmt, dtype):
    for k, n in shapes(fmt):
        packed, x = case(k, n, fmt, seed=k + n)
        inter = il.interleave(packed, fmt)
        x = x.to(dtype)
        for m in range(1, qk.MAX_ROWS + 1):
            y = qk.qlinear(x[:m], inter, fmt, layout="interleaved")
            assert y.dtype == dtype and torch.equal(y, definition(x[:m], packed, fmt)), (k, n, m)


@needs_vnni
@pytest.mark.parametrize("fmt", TYPES)
def test_interleaved_tiles_on_edge_blocks(fmt):
    """Every quant and scale bit set, clear, alternating; fp16 factors large, subnormal, zero, negative."""
    packed, x = edge_blocks(fmt)
    inter = il.interleave(packed, fmt)
    for m in (1, 2, 5):
        assert torch.equal(qk.qlinear(x[:m], inter, fmt, layout="interleaved"), definition(x[:m], packed, fmt))


@needs_vnni
@pytest.mark.parametrize("fmt", TYPES)
def test_interleaved_rows_alone_packed_in_one_call_and_on_one_thread(fmt):
    k, n = shapes(fmt)[1]
    packed, x = case(k, n, fmt, seed=5)
    inter = il.interleave(packed, fmt)
    x = x.to(torch.bfloat16)
    alone = torch.cat([qk.qlinear(x[i:i + 1], inter, fmt, layout="interleaved") for i in range(len(x))])
    assert torch.equal(alone, qk.qlinear(x, packed, fmt))                 # the file layout's bits
    for m in range(2, qk.MAX_ROWS + 1):
        assert torch.equal(qk.qlinear(x[:m], inter, fmt, layout="interleaved"), alone[:m])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(qk.qlinear(x, inter, fmt, layout="interleaved"), alone)
    finally:
        torch.set_num_threads(threads)
    weights = [blocks(rows, fmt, nb=k // layouts.block_values(fmt), seed=rows) for rows in (16, 48, 32)]
    ys = qk.qlinear_many(x[:3], [il.interleave(w, fmt) for w in weights], fmt, layout="interleaved")
    assert ys is not None
    for y, w in zip(ys, weights, strict=True):
        assert torch.equal(y, qk.qlinear(x[:3], w, fmt))


@needs_vnni
def test_the_interleaved_layout_is_asked_of_the_vnni_path_and_whole_groups_only():
    packed = blocks(32, "q4_K")
    x = torch.randn(1, 3 * 256)
    with pytest.raises(RuntimeError, match="AVX512-VNNI path only"):
        qk.qlinear(x, il.interleave(packed, "q4_K"), "q4_K", isa="avx2", layout="interleaved")
    with pytest.raises(RuntimeError, match="multiple of 16 rows"):
        qk.qlinear(x, packed[:24], "q4_K", layout="interleaved")
    with pytest.raises(ValueError, match="unknown layout"):
        qk.qlinear(x, packed, "q4_K", layout="rows")


@pytest.mark.parametrize("fmt", TYPES)
def test_interleaved_blocks_off_the_kernels_are_read_as_the_file_s(fmt, monkeypatch):
    """Where no kernel runs, the plain product and the dequantization de-interleave first."""
    k, n = shapes(fmt)[1]
    packed, x = case(k, n, fmt, seed=2)
    inter = il.interleave(packed, fmt)
    monkeypatch.setattr(qk, "native_module", lambda: None)
    assert torch.equal(qk.qlinear(x, inter, fmt, layout="interleaved"), qk.qlinear_reference(x, packed, fmt))
    out = torch.empty(n, k)
    assert torch.equal(qk.dequantize_into(inter, fmt, out, layout="interleaved"), layouts.dequantize(packed, fmt))


@pytest.mark.skipif(not qk.kernel_available(), reason="the quantized C++ kernels are not built here")
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pre_fill_tiles_of_interleaved_blocks_are_the_file_s(fmt, dtype):
    packed = blocks(48, fmt, nb=5, seed=3)
    inter = il.interleave(packed, fmt)
    k = 5 * layouts.block_values(fmt)
    isas = ["avx2"] + (["avx512bf16"] if dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported() else [])
    for isa in isas:
        want = qk.dequantize_into(packed, fmt, torch.empty(48, k, dtype=dtype), isa=isa)
        got = qk.dequantize_into(inter, fmt, torch.empty(48, k, dtype=dtype), isa=isa, layout="interleaved")
        assert torch.equal(got, want), isa
    assert torch.equal(want.float(), layouts.dequantize(packed, fmt).to(dtype).float())


def _moe_layer(fmt: str, dim: int = 256, hidden: int = 512, experts: int = 4) -> MoeFeedForward:
    layer = MoeFeedForward(dim, hidden, experts, 2)
    g = torch.Generator().manual_seed(3)
    for expert in layer.experts:
        for name, (n, k) in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden))):
            data = layouts.random_blocks(n, k, fmt, g, scale=2e-3)
            setattr(expert, name, ql.QuantLinear.from_quantized(QuantizedTensor(data, fmt, (n, k))))
    return layer


@needs_vnni
@pytest.mark.parametrize("fmt", TYPES)
def test_qmoe_over_experts_interleaved_in_their_stack(fmt):
    layer = _moe_layer(fmt)
    k = moe.stack_layer(layer)
    assert k is not None
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    routes = torch.randint(0, 4, (8, 2), generator=torch.Generator().manual_seed(2))
    routes[:, 1] = (routes[:, 0] + 1) % 4
    w = torch.softmax(torch.randn(8, 2), -1)
    with torch.no_grad():
        want = {t: qk.qmoe(x[:t], routes[:t], w[:t], k.w1, k.w3, k.w2, fmt) for t in (1, 3, 8)}
        for expert in layer.experts:
            for name in moe.MATRICES:
                assert getattr(expert, name).interleave_()
        for t in (1, 3, 8):
            got = qk.qmoe(x[:t], routes[:t], w[:t], k.w1, k.w3, k.w2, fmt, layout="interleaved")
            assert torch.equal(got, want[t]), t
            assert torch.equal(k(x[:t], routes[:t], w[:t]), want[t])        # the layer's kernel knows its layout
            assert torch.equal(layer.run_experts(x[:t], routes[:t], w[:t]), want[t])


# -- QuantLinear and the conversion pass ---------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("fmt", ["q4_K", "q8_0", "q5_0"])
def test_quant_linear_interleaved_in_place_keeps_its_bits_and_its_file_blocks(fmt, monkeypatch):
    monkeypatch.setattr(ql, "PREFILL_TILE_ROWS", 32)                  # several pre-fill tiles and a partial one
    k = 2 * layouts.block_values(fmt)
    packed = blocks(80, fmt, nb=2, seed=4)
    layer = ql.QuantLinear.from_quantized(QuantizedTensor(packed.clone(), fmt, (80, k)))
    x = {rows: torch.randn(rows, k).to(torch.bfloat16) for rows in (1, 8, 40)}
    with torch.no_grad():
        before = {rows: layer(xr) for rows, xr in x.items()}
        where = layer.qweight.data_ptr()
        assert layer.interleave_() and layer.layout == "interleaved" and "layout=interleaved" in repr(layer)
        assert layer.qweight.data_ptr() == where and not torch.equal(layer.qweight, packed)     # in place
        for rows, xr in x.items():
            assert torch.equal(layer(xr), before[rows]), rows
    assert torch.equal(layer.file_blocks(), packed)
    assert torch.equal(layer.dequantized_weight(), layouts.dequantize(packed, fmt, (80, k)))
    state = layer.state_dict()
    assert torch.equal(state["qweight"], packed)
    again = ql.QuantLinear(k, 80, fmt)
    again.load_state_dict(state)
    assert again.layout == "file" and torch.equal(again.qweight, packed)
    layer.load_state_dict(state)                                       # the file's blocks, copied in: file layout
    assert layer.layout == "file" and torch.equal(layer.qweight, packed)
    odd = ql.QuantLinear.from_quantized(QuantizedTensor(blocks(24, fmt, nb=2), fmt, (24, k)))
    assert not odd.interleave_() and odd.layout == "file"               # not a multiple of 16 rows


def _tokens(model, prompts):
    engine = Engine(model, None, max_rows=len(prompts), max_seq_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, stop_on_eos=False))
    return [c.tokens for c in done]


@needs_vnni
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_conversion_pass_interleaves_a_model_in_place_with_the_same_tokens_and_file(tmp_path, name):
    model = build_model(preset(name, vocab_size=4096), seed=0).to(torch.bfloat16)   # the bundled vocabulary's size
    backends.attach(model, "cpu", quantize="int4")
    linears = [m for m in model.modules() if isinstance(m, ql.QuantLinear)]
    inter = [m for m in linears if m.layout == "interleaved"]
    assert inter and all(m.layout == "file" for m in linears if m.out_features % 16)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    logits = model(torch.tensor([3, 1, 4, 1, 5]), [5])
    tokens = _tokens(model, prompts)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_gguf(model, tmp_path / "a" / "m.gguf", BUNDLED / "sirocco-tiny" / "tokenizer.model")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deinterleave_weights(model)
    assert all(m.layout == "file" for m in linears)
    assert torch.equal(model(torch.tensor([3, 1, 4, 1, 5]), [5]), logits)
    assert _tokens(model, prompts) == tokens
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    save_gguf(model, tmp_path / "b" / "m.gguf", BUNDLED / "sirocco-tiny" / "tokenizer.model")
    assert (tmp_path / "a" / "m.gguf").read_bytes() == (tmp_path / "b" / "m.gguf").read_bytes()
    assert interleave_weights(model) == len(inter)
    if name == "tiny-moe":                                             # the experts' stacks, interleaved in place
        kernel = model.layers["0"].feed_forward.experts_kernel
        assert isinstance(kernel, moe.StackedExperts)
        assert kernel.w1.data_ptr() == model.layers["0"].feed_forward.experts[0].w1.qweight.data_ptr()
    assert _tokens(model, prompts) == tokens


# -- the VNNI tiles' data flow on scalar emulations of their instructions --------------------------------------------
@pytest.mark.skipif(not os.environ.get("SIROCCO_TEST_VNNI_EMULATION"),
                    reason="set SIROCCO_TEST_VNNI_EMULATION=1 to build (a few minutes, once) and check the "
                           "interleaved tiles on scalar emulations of their AVX-512 operations")
@pytest.mark.skipif(not qk.kernel_available(), reason="the quantized C++ kernels are not built here")
@pytest.mark.parametrize("fmt", TYPES)
def test_interleaved_tiles_on_emulated_instructions_are_the_definition(fmt):
    emulated = qk.vnni_emulation_module()
    for k, n in shapes(fmt)[:2]:
        packed, x = case(k, n, fmt, seed=k)
        inter = il.interleave(packed, fmt)
        for m in (1, 2, 3, 8):
            got = emulated.qlinear_layout(x[:m], inter, qk.FMT_CODES[fmt], 2, 1)
            assert torch.equal(got, definition(x[:m], packed, fmt)), (k, m)
