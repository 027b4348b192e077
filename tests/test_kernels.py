"""The decode kernels: the products of F.linear to its own rounding error, the same bits for a row whatever
rows come with it, and no compile inside the decode loop."""

import logging

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from sirocco import backends
from sirocco.backends.cpu import kernels, modules
from sirocco.config import preset
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import Attention, RMSNorm, build_model

needs_native = pytest.mark.skipif(kernels.native_kernel() is None, reason="no AVX2/AVX-512 or no C++ build here")


def _paths(kernel: str):
    """Every build of ``kernel`` this CPU runs, with each dtype it serves there: (isa, dtype) parameters; the
    avx512 build's bf16 needs AVX512-BF16, so AVX2 hosts test the avx2 build only, AVX-512 ones both."""
    paths = [pytest.param(isa, dtype, id=f"{isa}-{str(dtype)[6:]}") for isa in ("avx512", "avx2")
             for dtype in (torch.float32, torch.bfloat16) if isa in kernels.candidate_isas(dtype, kernel)]
    return paths or [pytest.param(None, None, marks=pytest.mark.skip(reason=f"no {kernel} build for this CPU"))]


LINEAR_PATHS = _paths("linear")
needs_linear = pytest.mark.skipif(not kernels.cpu_isas(), reason="no small_m_linear build for this CPU")


def _build(isa):
    module = kernels.native_module(isa)
    if module is None:
        pytest.skip(f"the {isa} build is unavailable here")
    assert module.small_m_linear_isa() == isa
    return module


def _small_m_linear(isa):
    return _build(isa).small_m_linear


def _ks(isa, dtype):
    """Row lengths a build takes: the avx512 build whole vectors only; the avx2 build any K, so lengths that
    leave part of an 8-lane vector over (13, 1003) and one shorter than a vector (5)."""
    return [64, 1024] if isa == "avx512" else [5, 13, 64, 1003]


@pytest.mark.parametrize("k", [96, 5 * kernels.CHUNK], ids=["short", "chunked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_row_linear_matches_f_linear(dtype, tol, k):
    assert kernels._chunked(k) == (k > 96)
    x, w = torch.randn(1, k, dtype=dtype), torch.randn(40, k, dtype=dtype)
    scale = (k / 96) ** 0.5                      # sums of k products: the error grows with sqrt(k)
    torch.testing.assert_close(kernels.row_linear(x, w), F.linear(x, w), atol=tol * scale, rtol=tol)


@needs_linear
@pytest.mark.parametrize("isa,dtype", LINEAR_PATHS)
def test_small_m_linear_as_accurate_as_f_linear(isa, dtype):
    """Against a float64 product of the same inputs: no larger error than F.linear's, for 1..8 rows and a row
    count (N = 301) that leaves rows over after the tiles."""
    small_m_linear = _small_m_linear(isa)
    for k in _ks(isa, dtype):
        g = torch.Generator().manual_seed(k)
        w = torch.randn(301, k, generator=g).to(dtype)
        for m in range(1, kernels.SMALL_M + 1):
            x = torch.randn(m, k, generator=g).to(dtype)
            exact = x.double() @ w.double().T
            ours, theirs = small_m_linear(x, w), F.linear(x, w)
            assert ours.dtype == dtype and ours.shape == (m, 301)
            err, ref_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
            # bf16 output: both round the same fp32 sum to bf16, so they differ by at most one bf16 step
            assert err <= 1.5 * ref_err + 1e-6 * exact.abs().max(), (k, m, err.item(), ref_err.item())


@needs_linear
@pytest.mark.parametrize("isa,dtype", LINEAR_PATHS)
def test_small_m_linear_equals_fp32_reference_to_rounding(isa, dtype):
    """Against the plain fp32 product rounded to the output dtype, elementwise: within the bound of a sum of k
    fp32 products (k * 2^-24 * sum |x| |w|, for each of the two) plus one step of the output dtype."""
    small_m_linear = _small_m_linear(isa)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0
    for k in _ks(isa, dtype):
        g = torch.Generator().manual_seed(k + 1)
        w = torch.randn(37, k, generator=g).to(dtype)
        for m in range(1, kernels.SMALL_M + 1):
            x = torch.randn(m, k, generator=g).to(dtype)
            reference = (x.float() @ w.float().T).to(dtype).double()
            bound = 2 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T) + step * reference.abs()
            diff = (small_m_linear(x, w).double() - reference).abs()
            assert (diff <= bound).all(), (k, m, (diff - bound).max().item())


@needs_linear
@pytest.mark.parametrize("isa,dtype", LINEAR_PATHS)
def test_small_m_linear_row_bits_do_not_depend_on_other_rows(isa, dtype):
    small_m_linear = _small_m_linear(isa)
    for k in (256, 1003) if isa == "avx2" else (256,):     # 1003: a partial last vector in every row
        g = torch.Generator().manual_seed(3)
        w = torch.randn(100, k, generator=g).to(dtype)
        x = torch.randn(kernels.SMALL_M, k, generator=g).to(dtype)
        alone = torch.cat([small_m_linear(x[i:i + 1], w) for i in range(len(x))])
        for m in range(2, kernels.SMALL_M + 1):
            assert torch.equal(small_m_linear(x[:m], w), alone[:m]), (k, m)
            assert torch.equal(small_m_linear(x[m - 2:m], w), alone[m - 2:m]), (k, m)   # nor on the rows beside
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            assert torch.equal(small_m_linear(x, w), alone)           # nor on the thread count
            assert torch.equal(small_m_linear(x[:1], w), alone[:1])
        finally:
            torch.set_num_threads(threads)


@needs_linear
@pytest.mark.parametrize("isa", sorted({p.values[0] for p in LINEAR_PATHS}))
def test_small_m_linear_refuses_bad_input_by_name(isa):
    small_m_linear = _small_m_linear(isa)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        small_m_linear(torch.zeros(9, 32), torch.zeros(4, 32))
    with pytest.raises(RuntimeError, match=r"expected x \(M, K\) and w \(N, K\)"):
        small_m_linear(torch.zeros(2, 32), torch.zeros(4, 48))
    with pytest.raises(RuntimeError, match="bf16 or fp32 only"):
        small_m_linear(torch.zeros(2, 32, dtype=torch.float64), torch.zeros(4, 32, dtype=torch.float64))
    if isa == "avx512":                           # whole vectors only, and native_serves says so
        with pytest.raises(RuntimeError, match="multiple of 16"):
            small_m_linear(torch.zeros(2, 24), torch.zeros(4, 24))
        assert not kernels.native_serves(torch.float32, 24) or kernels.kernel_isa(torch.float32) != "avx512"
    else:
        assert kernels.native_serves(torch.float32, 13) == (kernels.kernel_isa(torch.float32) == "avx2")


@pytest.mark.parametrize("capability,avx512_bf16,fp32,bf16", [
    ("AVX512", True, ("avx512", "avx2"), ("avx512", "avx2")),
    ("AVX512", False, ("avx512", "avx2"), ("avx2",)),       # bf16 on AVX-512 without its dot product: avx2
    ("AVX2", False, ("avx2",), ("avx2",)),
    ("DEFAULT", False, (), ()),
])
def test_each_dtype_goes_to_a_build_the_cpu_runs(monkeypatch, capability, avx512_bf16, fp32, bf16):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernels, "_bf16_dot_product_supported", lambda: avx512_bf16)
    assert kernels.candidate_isas(torch.float32) == fp32 and kernels.candidate_isas(torch.bfloat16) == bf16
    assert kernels.candidate_isas(torch.float16) == ()
    for kernel in ("attention", "rms_norm", "rope"):         # every kernel is in both builds
        assert kernels.candidate_isas(torch.float32, kernel) == fp32
        assert kernels.candidate_isas(torch.bfloat16, kernel) == bf16


@pytest.mark.parametrize("capability,avx512_bf16,amx,slow", [
    ("AVX2", False, False, True), ("AVX512", False, False, True), ("AVX512", True, False, False),
    ("AVX512", False, True, False), ("SVE256", False, False, False)])
def test_bf16_gemm_is_slow_without_avx512_bf16_or_amx(monkeypatch, capability, avx512_bf16, amx, slow):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    kernels.bf16_gemm_is_slow.cache_clear()
    try:
        assert kernels.bf16_gemm_is_slow() == slow
        with torch.no_grad():
            assert kernels.upcast_pays(torch.zeros(16, 8, dtype=torch.bfloat16)) == slow
    finally:
        kernels.bf16_gemm_is_slow.cache_clear()


def test_upcast_pays_only_for_bf16_pre_fill_rows_without_autograd(monkeypatch):
    monkeypatch.setattr(kernels, "bf16_gemm_is_slow", lambda: True)
    rows = kernels.UPCAST_MIN_ROWS
    with torch.no_grad():
        assert kernels.upcast_pays(torch.zeros(rows, 8, dtype=torch.bfloat16))
        assert kernels.upcast_pays(torch.zeros(1, rows, 8, dtype=torch.bfloat16))          # leading dims count
        assert not kernels.upcast_pays(torch.zeros(rows - 1, 8, dtype=torch.bfloat16))
        assert not kernels.upcast_pays(torch.zeros(rows, 8))                                # fp32: PyTorch's own
        assert not kernels.upcast_pays(torch.zeros(0, 8, dtype=torch.bfloat16))
    assert not kernels.upcast_pays(torch.zeros(rows, 8, dtype=torch.bfloat16))              # autograd: reference


@pytest.mark.parametrize("rows,k,n", [(4, 64, 40), (37, 72, 300), (2, 3, 5)])
def test_upcast_linear_equals_bf16_f_linear_to_rounding(monkeypatch, rows, k, n):
    """The fp32 product rounded once to bf16, weight tiles of a few rows (a partial last one) so that every tile
    boundary is crossed: within one bf16 step of bf16 F.linear (each rounds an fp32 sum), and equal to the
    plain fp32 product rounded to bf16 to fp32 rounding."""
    monkeypatch.setattr(kernels, "UPCAST_TILE_BYTES", 16 * 4 * k + 4)           # 16 rows a tile
    g = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        ours, theirs = kernels.upcast_linear(x, w), F.linear(x, w)
        ours3 = kernels.upcast_linear(x[None], w)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, n) and torch.equal(ours3[0], ours)
    fp32_bound = 2 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    step = 2.0 ** -7 * theirs.double().abs()
    assert ((ours.double() - theirs.double()).abs() <= step + fp32_bound).all()
    reference = (x.float() @ w.float().T).to(torch.bfloat16).double()
    assert ((ours.double() - reference).abs() <= 2.0 ** -7 * reference.abs() + fp32_bound).all()


@pytest.mark.parametrize("pays", [True, False])
def test_cpu_linear_takes_the_upcast_path_exactly_where_it_pays(monkeypatch, pays):
    calls = []
    real = kernels.upcast_linear
    monkeypatch.setattr(kernels, "upcast_pays", lambda x: pays)
    monkeypatch.setattr(kernels, "upcast_linear", lambda x, w: calls.append(x.shape) or real(x, w))
    weight = torch.nn.Parameter(torch.randn(24, 40).to(torch.bfloat16))
    layer = modules.CpuLinear(weight)
    x = torch.randn(kernels.SMALL_M + 3, 40).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        expected = F.linear(x, weight)
    assert calls == ([x.shape] if pays else [])
    assert torch.equal(out, expected) if not pays else ((out.float() - expected.float()).abs()
                                                        <= 2.0 ** -7 * expected.float().abs() + 1e-4).all()


def test_unbuildable_kernel_falls_back_with_a_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension\nno compiler")

    monkeypatch.setattr(cpp, "load_inline", broken)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_build_failed", set())
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level(logging.WARNING, logger="sirocco.backends.cpu.kernels"):
        assert kernels.native_kernel() is None
    assert "C++ decode kernels unavailable" in caplog.text and "no compiler" in caplog.text
    assert kernels._build_failed == {"avx512", "avx2"}          # the avx2 build was tried after the avx512 one
    assert not kernels.native_serves(torch.float32, 64) and not kernels.native_serves(torch.bfloat16, 64)
    plain_layer = torch.nn.Linear(64, 8, bias=False)
    layer = modules.CpuLinear(plain_layer.weight)
    x = torch.randn(3, 64)
    plain_norm = RMSNorm(64, 1e-5)
    norm = modules.CpuRMSNorm.of(plain_norm)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        assert torch.equal(norm(x), plain_norm(x))


@pytest.mark.parametrize("path,arch", [("native", "tiny"), ("native", "tiny-moe"), ("compiled", "tiny")])
def test_fast_decode_engine_same_tokens_and_no_recompile(path, arch, monkeypatch):
    if path == "native" and kernels.native_kernel() is None:
        pytest.skip("no AVX2/AVX-512 or no C++ build here")
    if path == "compiled":              # a CPU the native kernel does not serve: single rows go to Inductor
        monkeypatch.setattr(kernels, "native_serves", lambda dtype, k, kernel="linear": False)
    args = preset(arch, vocab_size=300, sliding_window=6)
    model = build_model(args, seed=31)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (9, 4)]
    params = SamplingParams(max_tokens=12)
    backends.attach(model, "torch")
    plain = Engine(model, None, max_rows=2, max_seq_len=64).generate(prompts, params)
    assert backends.attach(model, "cpu").backend == "cpu"                      # converts and warms up
    fast_engine = Engine(model, None, max_rows=2, max_seq_len=64)
    assert fast_engine.backend == "cpu"
    assert {type(m) for m in model.modules()} >= {modules.CpuLinear, modules.CpuRMSNorm}
    assert {type(m.ops) for m in model.modules() if isinstance(m, Attention)} == {modules.CpuAttentionOps}
    assert kernels.native_serves(torch.float32, args.dim) == (path == "native")
    with torch._dynamo.config.patch(error_on_recompile=True):
        alone = fast_engine.generate([prompts[0]], params)
        both = fast_engine.generate(prompts, params)
    assert alone[0].tokens == plain[0].tokens and [c.tokens for c in both] == [c.tokens for c in plain]
    for fast, ref in [(alone[0], plain[0]), (both[0], plain[0]), (both[1], plain[1])]:
        torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    assert set(model.state_dict()) == set(build_model(args).state_dict())



def _exact_decode_attention(q, k, v, valid):
    """float64 decode attention on a dense mask: the reference for both decode paths."""
    B, H, D = q.shape
    G = k.shape[1]
    s = torch.einsum("bgjd,bgld->bgjl", q.double().view(B, G, H // G, D), k.double()) / D ** 0.5
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bgjl,bgld->bgjd", torch.softmax(s, -1), v.double()).reshape(B, H, D)


@pytest.mark.parametrize("isa,dtype", _paths("attention"))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (5, 1, 96), (4, 4, 128), (12, 2, 64), (4, 2, 40)])
def test_native_decode_attention_as_accurate_as_matmul(isa, dtype, heads, kv_heads, head_dim):
    """Several query heads per kv head (1, 4, 5, 6: blocks of 4 plus the rest), head_dims that leave a partial
    block of values (96 and 40 of the 4 x 16 or 2 x 8 a block takes), cache rows as a view of a larger cache, and
    rows filled to different lengths."""
    from sirocco.backends.cpu.modules import native_decode_attention
    from sirocco.model.attention import decode_attention
    native = _build(isa)
    if head_dim % kernels.SERVES[isa]["attention"][dtype]:
        pytest.skip(f"head_dim {head_dim} is not served by the {isa} build")
    g = torch.Generator().manual_seed(heads * head_dim)
    B, S, L = 3, 40, 33
    cache_k = torch.randn(5, kv_heads, S, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(5, kv_heads, S, head_dim, generator=g).to(dtype)
    k, v = cache_k[:B, :, :L], cache_v[:B, :, :L]                      # what LayerCache.rows_view gives
    q = torch.randn(B, heads, head_dim, generator=g).to(dtype)
    valid = torch.arange(L)[None, :] < torch.tensor([33, 1, 20])[:, None]
    valid[2, :5] = False                                                # a wrapped ring's empty slots, say
    exact = _exact_decode_attention(q, k, v, valid)
    with torch.no_grad():
        ours, matmul = native_decode_attention(q, k, v, valid, native), decode_attention(q, k, v, valid)
    assert ours.dtype == dtype and ours.shape == (B, heads, head_dim)
    err, ref_err = (ours.double() - exact).abs().max(), (matmul.double() - exact).abs().max()
    assert err <= ref_err + 1e-6, (err.item(), ref_err.item())
    # a sequence's result does not depend on the others in the step
    for b in range(B):
        alone = native_decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], valid[b:b + 1], native)[0]
        assert torch.equal(alone, ours[b])


@pytest.mark.parametrize("isa,dtype", _paths("attention"))
def test_decode_attention_through_row_and_slot_maps_has_the_bits_of_the_plain_path(isa, dtype):
    """``decode_scores_at`` / ``decode_values_at`` over a whole layer cache (queries sharing a row, keys read through
    a slot map) give the bits of ``decode_scores`` / ``decode_values`` over the keys gathered into rows; so does the
    reference ``decode_at``."""
    from sirocco.model.attention import AttentionOps, decode_attention
    native = _build(isa)
    g = torch.Generator().manual_seed(7)
    R, G, S, H, D, L = 5, 2, 11, 8, 32, 9
    cache_k = torch.randn(R, G, S, D, generator=g).to(dtype)
    cache_v = torch.randn(R, G, S, D, generator=g).to(dtype)
    rows = torch.tensor([2, 0, 2, 4])
    slots = torch.stack([torch.randperm(S, generator=g)[:L] for _ in rows])
    valid = torch.arange(L)[None, :] < torch.tensor([9, 4, 1, 7])[:, None]
    q = torch.randn(len(rows), H, D, generator=g).to(dtype)
    k = cache_k[rows[:, None], :, slots].transpose(1, 2).contiguous()      # (B, G, L, D), gathered
    v = cache_v[rows[:, None], :, slots].transpose(1, 2).contiguous()
    scale = 1.0 / D ** 0.5
    scores = native.decode_scores_at(q, cache_k, rows, slots, valid, scale)
    assert torch.equal(scores, native.decode_scores(q, k, valid, scale))
    probs = torch.softmax(scores, dim=-1)
    assert torch.equal(native.decode_values_at(probs, cache_v, rows, slots), native.decode_values(probs, v))
    assert torch.equal(AttentionOps().decode_at(q, cache_k, cache_v, rows, slots, valid),
                       decode_attention(q, k, v, valid))
    bad = slots.clone()
    bad[1, 2] = S
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 11\), got 11"):
        native.decode_scores_at(q, cache_k, rows, bad, valid, scale)
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 5\), got 5"):
        native.decode_values_at(probs, cache_v, rows + 1, slots)
    with pytest.raises(RuntimeError, match=r"expected rows \(B,\) and slots \(B, L\)"):
        native.decode_scores_at(q, cache_k, rows[:3], slots, valid, scale)


def test_decode_softmax_keeps_a_query_s_bits_beside_longer_ones():
    """PyTorch's softmax gives -inf padding the same bits only within one of its two regimes (a row shorter than a
    vector, or not); ``decode_softmax`` computes a short query's softmax in its own regime, so its bits are those
    it gets alone, whatever the length of the step's longest query."""
    lanes = modules.softmax_lanes()
    g = torch.Generator().manual_seed(3)
    for fill in (1, 3, lanes - 1, lanes, 2 * lanes + 3):
        scores = torch.randn(1, 4, fill, generator=g) * 4
        alone = torch.softmax(scores, dim=-1)
        for width in (fill, lanes - 1, lanes, 3 * lanes, 4 * lanes + 5):
            if width < fill:
                continue
            padded = torch.full((2, 4, width), float("-inf"))
            padded[0, :, :fill] = scores[0]
            padded[1] = torch.randn(4, width, generator=g)                # a longer query beside it
            got = modules.decode_softmax(padded, [fill, width])[0, :, :fill]
            assert torch.equal(got, alone[0]), (fill, width)
    # the property decode_softmax rests on: within a regime padding keeps the bits, across it need not
    x = torch.randn(64, 1, 3, generator=g) * 4
    pad = lambda n: torch.cat([x, torch.full((64, 1, n - 3), float("-inf"))], -1)
    assert torch.equal(torch.softmax(pad(lanes - 1), -1)[..., :3], torch.softmax(x, -1))
    assert torch.equal(torch.softmax(pad(4 * lanes), -1)[..., :3], torch.softmax(pad(lanes), -1)[..., :3])


@pytest.mark.parametrize("isa,dtype", _paths("attention"))
def test_native_decode_attention_refuses_bad_input_by_name(isa, dtype):
    from sirocco.backends.cpu.modules import native_decode_attention
    native = _build(isa)
    q, kv = torch.zeros(2, 4, 32, dtype=dtype), torch.zeros(2, 2, 8, 32, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"expected q \(B, H, D\) and k \(B, G, L, D\)"):
        native_decode_attention(q, torch.zeros(2, 3, 8, 32, dtype=dtype), kv, torch.ones(2, 8, dtype=torch.bool),
                                native)
    with pytest.raises(RuntimeError, match="valid a \\(B, L\\) bool"):
        native_decode_attention(q, kv, kv, torch.ones(2, 7, dtype=torch.bool), native)
    width = kernels.SERVES[isa]["attention"][dtype]
    with pytest.raises(RuntimeError, match=f"head_dim must be a multiple of {width}"):
        odd = torch.zeros(2, 2, 8, 12, dtype=dtype)
        native_decode_attention(torch.zeros(2, 4, 12, dtype=dtype), odd, odd, torch.ones(2, 8, dtype=torch.bool),
                                native)


@pytest.mark.parametrize("isa,dtype", _paths("rms_norm"))
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 2048), (37, 96), (2, 40)])
def test_rms_norm_kernel_as_accurate_as_rmsnorm(isa, dtype, rows, dim):
    """Against float64 with the model's two roundings (normalised, then times the weight): no larger error than
    model.RMSNorm's, and a row's bits do not depend on the rows beside it."""
    from sirocco.model import RMSNorm
    native = _build(isa)
    if dim % kernels.SERVES[isa]["rms_norm"][dtype]:
        pytest.skip(f"dim {dim} is not served by the {isa} build")
    g = torch.Generator().manual_seed(rows * dim)
    x = (3 * torch.randn(rows, dim, generator=g)).to(dtype)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
        ours, theirs = native.rms_norm(x, norm.weight, norm.eps), norm(x)
        xd = x.double()
        normed = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
        exact = normed.double() * norm.weight.double()
    assert ours.dtype == dtype and ours.shape == x.shape
    err, ref_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23          # one rounding step, relative
    assert err <= ref_err + step * exact.abs().max(), (err.item(), ref_err.item())
    for r in range(rows):
        assert torch.equal(native.rms_norm(x[r:r + 1], norm.weight, norm.eps)[0], ours[r])


@pytest.mark.parametrize("isa,dtype", _paths("rope"))
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 16, 128), (5, 3, 16), (33, 4, 64), (3, 2, 8)])
def test_rope_kernel_same_bits_as_apply_rope(isa, dtype, tokens, heads, head_dim):
    from sirocco.model import apply_rope, rope_tables
    native = _build(isa)
    if head_dim % kernels.SERVES[isa]["rope"][dtype]:
        pytest.skip(f"head_dim {head_dim} is not served by the {isa} build")
    g = torch.Generator().manual_seed(tokens * heads)
    cos, sin = rope_tables(head_dim, 4096, 1e6)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    x = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    x[0, 0, :2] = torch.tensor([float("nan"), float("inf")])            # the roundings of NaN and inf too
    ours = native.rope(x, cos[positions], sin[positions])
    assert ours.dtype == dtype and torch.equal(ours.isnan(), apply_rope(x, cos[positions], sin[positions]).isnan())
    assert torch.equal(ours.nan_to_num(), apply_rope(x, cos[positions], sin[positions]).nan_to_num())


@pytest.mark.parametrize("isa,dtype", _paths("rms_norm"))
def test_norm_and_rope_kernels_refuse_bad_input_by_name(isa, dtype):
    native = _build(isa)
    width = kernels.SERVES[isa]["rms_norm"][dtype]
    with pytest.raises(RuntimeError, match=r"rms_norm: expected x \(T, D\) and weight \(D\)"):
        native.rms_norm(torch.zeros(2, 32, dtype=dtype), torch.ones(16, dtype=dtype), 1e-5)
    with pytest.raises(RuntimeError, match=f"rms_norm: D must be a multiple of {width}"):
        native.rms_norm(torch.zeros(2, 12, dtype=dtype), torch.ones(12, dtype=dtype), 1e-5)
    with pytest.raises(RuntimeError, match=r"rope: expected x \(T, H, D\) and cos, sin \(T, D/2\)"):
        native.rope(torch.zeros(3, 2, 32, dtype=dtype), torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(RuntimeError, match="rope: cos and sin must be fp32"):
        native.rope(torch.zeros(3, 2, 32, dtype=dtype), torch.zeros(3, 16, dtype=torch.float64), torch.zeros(3, 16))
    with pytest.raises(RuntimeError, match=f"rope: head_dim must be a multiple of {width}"):
        native.rope(torch.zeros(3, 2, 12, dtype=dtype), torch.zeros(3, 6), torch.zeros(3, 6))


@needs_native
def test_fast_modules_keep_autograd_and_plain_results():
    """With autograd on (training), the swapped modules are the model's own: same results, gradients flow."""
    args = preset("tiny", vocab_size=300)
    model, plain = build_model(args, seed=5), build_model(args, seed=5)
    assert modules.attach(model) == sum(isinstance(m, (torch.nn.Linear, RMSNorm)) for m in plain.modules())
    assert {type(m) for m in model.modules()} >= {modules.CpuLinear, modules.CpuRMSNorm}
    assert all(isinstance(m.ops, modules.CpuAttentionOps) for m in model.modules() if isinstance(m, Attention))
    tokens = torch.randint(0, 300, (11,))
    loss = model(tokens, [11]).logsumexp(-1).mean()
    loss.backward()
    assert torch.equal(model(tokens, [11]), plain(tokens, [11]))
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():                       # no autograd: the kernels, to their rounding
        torch.testing.assert_close(model(tokens, [11]), plain(tokens, [11]), atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("lengths", [[5], [9, 4]], ids=["decode-kernel", "pre-fill"])
def test_bf16_model_on_the_cpu_backend_as_accurate_as_the_reference(monkeypatch, lengths):
    """A bf16 model through the backend (5 tokens: small_m_linear's bf16 path; 13 packed tokens: the fp32 upcast
    of the pre-fill products, forced on) against the same weights in fp32: no further off than the reference
    bf16 model."""
    monkeypatch.setattr(kernels, "bf16_gemm_is_slow", lambda: True)
    paths = []
    native_kernel, upcast_linear = kernels.native_kernel, kernels.upcast_linear
    monkeypatch.setattr(kernels, "native_kernel", lambda dtype: paths.append("native") or native_kernel(dtype))
    monkeypatch.setattr(kernels, "upcast_linear", lambda x, w: paths.append("upcast") or upcast_linear(x, w))
    args = preset("tiny", vocab_size=300)
    exact = build_model(args, seed=7)
    model, plain = build_model(args, seed=7, dtype=torch.bfloat16), build_model(args, seed=7, dtype=torch.bfloat16)
    exact.load_state_dict({k: v.float() for k, v in plain.state_dict().items()})   # the same (bf16) values
    modules.attach(model)
    tokens = torch.randint(0, 300, (sum(lengths),))
    with torch.no_grad():
        want = exact(tokens, lengths)
        ours, ref = model(tokens, lengths).float(), plain(tokens, lengths).float()
    assert set(paths) == ({"native"} if sum(lengths) <= kernels.SMALL_M else {"upcast"})
    err, ref_err = (ours - want).abs().max().item(), (ref - want).abs().max().item()
    assert err <= 1.5 * ref_err + 1e-3 * want.abs().max().item(), (err, ref_err)


def test_prefill_products_round_their_rows_up_to_a_bucket(monkeypatch):
    # the matrix library keeps a compiled kernel per row count: pre-fill rows (a prompt's length, a MoE expert's
    # tokens) are padded with zero rows to a multiple of ROW_BUCKET, and the padding's outputs dropped
    seen = []
    w = torch.randn(40, 64)

    def linear(rows):
        seen.append(rows.shape[0])
        return F.linear(rows, w)
    with torch.inference_mode():
        for m, called in [(5, 5), (31, 31), (33, 64), (64, 64), (100, 128)]:
            x = torch.randn(m, 64)
            y = kernels.bucketed_linear(x, linear)
            assert seen[-1] == called and y.shape == (m, 40)
            torch.testing.assert_close(y, F.linear(x, w))
    x = torch.randn(33, 64, requires_grad=True)
    assert kernels.bucketed_linear(x, linear).shape == (33, 40) and seen[-1] == 33      # autograd: as it is
    # the CPU backend's pre-fill goes through it
    layer = modules.CpuLinear(torch.nn.Parameter(w))
    calls = []
    real = kernels.bucketed_linear
    monkeypatch.setattr(kernels, "bucketed_linear", lambda x, f: calls.append(x.shape[0]) or real(x, f))
    with torch.inference_mode():
        layer(torch.randn(50, 64))
    assert calls == [50]
