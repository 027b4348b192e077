"""The K-quant, IQ4 and legacy quantizers (backends/quant/quantizers.py) against independent references:

- the layout: the ``gguf`` package's numpy dequantizer, applied to our bytes, gives back bit for bit the values
  our own scales and levels stand for, on random and adversarial rows;
- the types the ``gguf`` package quantizes itself (q4_0, q4_1, q5_0, q5_1, q8_0): the same bytes;
- llama.cpp: the bytes ``llama-quantize --pure`` wrote for one fixed tensor, by their SHA-256 (``LLAMA_CPP``);
- the error stays within a step of each type's levels, and the search beats plain round-to-nearest.
"""

import hashlib
import warnings
from itertools import pairwise

import numpy as np
import pytest
import torch

from sirocco.backends.quant import formats
from sirocco.backends.quant.quantizers import (
    IQ4_VALUES,
    TYPES,
    _nearest_code,
    _sqrt,
    canonical,
    packed_shape,
    quantize,
    quantize_with_values,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QTYPE = {t: GGMLQuantizationType[t.upper()] for t in TYPES}
SEARCHED = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs"]
GGUF_QUANTIZES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def golden_weight(rows: int, cols: int, salt: int) -> torch.Tensor:
    """A heavy-tailed fp32 weight from integer hashing and IEEE-exact float64 operations only, so that it is the
    same bits on every platform and version (the input the llama.cpp hashes below were made from).

    Value = s / sqrt(1.0001 - s^2) * 0.02 * (0.25 + (row % 7) / 4), with s uniform in [-1, 1) from splitmix64 of
    the flat index (salted): most values near +-0.02, a few up to +-2, rows of seven different scales."""
    with np.errstate(over="ignore"):
        z = np.arange(rows * cols, dtype=np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    s = 2.0 * ((z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53) - 1.0
    x = (s / np.sqrt(1.0001 - s * s) * 0.02).reshape(rows, cols)
    x *= 0.25 + (np.arange(rows) % 7)[:, None] / 4
    return torch.from_numpy(x.astype(np.float32))


# SHA-256 of the bytes llama.cpp's llama-quantize (commit 0c1e57098, as vendored by llama-cpp-python 0.3.36)
# wrote with `--pure` for golden_weight(256, 1024, 1) placed as blk.0.ffn_down.weight of an f32 GGUF model
# (dim 256, hidden 1024). No importance matrix, as llama-quantize quantizes by default.
LLAMA_CPP: dict[str, str] = {
    "q4_0": "aceef95de29aa6d798abf4f6d4abdaf56100bea9d6eec6cc1921c1b2370df053",
    "q4_1": "c9f8de3ecfbdec2a7c796538d804e73d1452be3ad815bef31004df93dddaf393",
    "q5_0": "411cdaa42494ebadcc43c4bd355eed977aba8fabd0238350e1ef78676a7dc788",
    "q5_1": "eaa419f457d10c5de49e82aef8493b8ea5877cd2d7f7130c2f2388170cc59cda",
    "q8_0": "b4fcd16f1982cf636269724ee73bfcd9d6e19235598d4b6b78e7b52dae885b98",
    "q2_K": "260d3d313bd5b6efdf8828c0ada675f5c9d4d16b76bdb94cd54feb47486aa51d",
    "q3_K": "9e84fe40fea48cc3e95a267681daabd7184d103dea2bfdc9cfc3210a2b186b79",
    "q4_K": "826125d87b4c4667afc8a467a68e5d91470de7c0d0f2c4e2d879648cb49b5574",
    "q5_K": "3264bac441c04e540955a8305593099dbe58724debbeabdb9f2ac50d35a29e5e",
    "q6_K": "cecefc05e0dfb401a8e04975e56d18a8e951c65b4eb9077489e62ebc51f27171",
    "iq4_nl": "2e214d98183b10728037dc60ca71bf4093426120a8fd41a3c3eef5853685bdbd",
    "iq4_xs": "d914b50f56e97fdce16842419d89cd7d8e0e6240c562b0dfbc231edaacf5399b",
}


def adversarial_rows(k: int = 512) -> dict[str, torch.Tensor]:
    """Named (R, k) fp32 rows at the edges of the searches."""
    g = torch.Generator().manual_seed(3)
    outlier = torch.randn(4, k, generator=g) * 1e-3
    outlier[:, 7] = 10.0
    negative_outlier = torch.randn(4, k, generator=g) * 1e-3
    negative_outlier[:, 300] = -10.0
    return {
        "gaussian": torch.randn(16, k, generator=g),
        "heavy tails": torch.distributions.StudentT(2.0).sample((16, k)),
        "negative only": -torch.rand(4, k, generator=g) - 0.1,
        "positive only": torch.rand(4, k, generator=g) + 0.1,
        "one outlier": outlier,
        "one negative outlier": negative_outlier,
        "constant": torch.full((2, k), 0.37),
        "negative constant": torch.full((2, k), -0.37),
        "zeros": torch.zeros(2, k),
        "huge": torch.randn(4, k, generator=g) * 1e4,
        "linspace": torch.linspace(-1, 1, k).repeat(2, 1),
        "integers": torch.randint(-8, 8, (4, k), generator=g).float(),
        "sparse": torch.where(torch.rand(4, k, generator=g) < 0.05, torch.randn(4, k, generator=g), 0.0),
    }


def tiny_rows(k: int = 512) -> dict[str, torch.Tensor]:
    """Rows whose scales underflow fp16 (stored as subnormals or zero), and fp32 subnormal values."""
    g = torch.Generator().manual_seed(4)
    return {"tiny": torch.randn(4, k, generator=g) * 1e-6, "tinier": torch.randn(4, k, generator=g) * 1e-20,
            "fp32 subnormal": torch.randn(2, k, generator=g) * 1e-40}


def gguf_dequantize(packed: torch.Tensor, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(packed.numpy(), QTYPE[qtype])


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("name", list(adversarial_rows()) + list(tiny_rows()))
def test_gguf_dequantizer_gives_back_the_values_we_chose(qtype, name):
    x = {**adversarial_rows(), **tiny_rows()}[name]
    packed, values = quantize_with_values(x, qtype)
    assert packed.shape == packed_shape(x.shape, qtype) and packed.dtype == torch.uint8
    theirs = gguf_dequantize(packed, qtype)
    assert np.array_equal(theirs.view(np.uint32), values.numpy().view(np.uint32))


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES)
@pytest.mark.parametrize("name", list(adversarial_rows()) + list(tiny_rows()))
def test_legacy_types_match_the_gguf_quantizer(qtype, name):
    x = {**adversarial_rows(), **tiny_rows()}[name]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        theirs = gguf.quants.quantize(x.numpy(), QTYPE[qtype])
    assert np.array_equal(quantize(x, qtype).numpy(), theirs)
    if qtype in formats.FORMATS:
        assert torch.equal(quantize(x, qtype), formats.quantize(x, qtype))


@pytest.mark.parametrize("qtype", ["q4_1", "q5_1"])
def test_a_zero_min_takes_the_sign_of_the_first_zero(qtype):
    """ggml's min keeps the first of equal values (the gguf package's numpy min may not: not compared there)."""
    x = torch.zeros(2, 32)
    x[0, 1] = -0.0
    x[1, 0], x[1, 1] = -0.0, 0.0
    m = quantize(x, qtype)[:, 2:4].contiguous().view(torch.int16)[:, 0]
    assert m.tolist() == [0, -32768]          # fp16 +0 and -0


# Largest error allowed, against the largest magnitude of the block (the super-block for the K types): one
# step between levels (2 / (levels - 1) of the range -amax..amax; the widest gap, 24 / 127, for the iq4
# codebook), and for q6_K half a step more for its 8-bit sub-block scales, which zero a sub-block whose scale
# is below 1/256 of the largest.
STEP = {"q4_0": 2 / 15, "q4_1": 2 / 15, "q5_0": 2 / 31, "q5_1": 2 / 31, "q8_0": 2 / 254,
        "q2_K": 2 / 3, "q3_K": 2 / 7, "q4_K": 2 / 15, "q5_K": 2 / 31, "q6_K": 1.5 * 2 / 63,
        "iq4_nl": 24 / 127, "iq4_xs": 24 / 127}


@pytest.mark.parametrize("qtype", list(TYPES))
def test_error_within_a_step_of_the_levels(qtype):
    block = TYPES[qtype][0]
    for name, x in adversarial_rows().items():
        _, values = quantize_with_values(x, qtype)
        xb, vb = x.reshape(-1, block), values.reshape(-1, block)
        amax = xb.abs().amax(1)
        worst = ((vb - xb).abs().amax(1) / amax.clamp(min=1e-30)).max().item()
        assert worst <= STEP[qtype], (name, worst)
        if name in ("zeros", "constant", "negative constant"):
            assert torch.allclose(values, x, rtol=2e-3, atol=0), name
    for name, x in tiny_rows().items():
        # fp16 scales underflow: the output is zero, or, for the types with a min, the min's offset may survive
        # a scale that rounded to zero (up to twice the largest magnitude away; llama.cpp's bytes are the same)
        _, values = quantize_with_values(x, qtype)
        assert ((values - x).abs() <= 2 * x.abs().amax()).all() and values.isfinite().all(), name


@pytest.mark.parametrize("qtype", SEARCHED)
def test_the_search_beats_round_to_nearest(qtype):
    """Less squared error than rounding from each block's first guess: on Gaussian rows by 4% or more, and on
    average over heavy-tailed ones too (where the x^2 weights of q3_K, q6_K and iq4 favour the large values)."""
    rows = adversarial_rows()
    block = TYPES[qtype][0]

    def errors(x):
        _, searched = quantize_with_values(x, qtype)
        _, plain = quantize_with_values(x, qtype, search=False)
        return [((v - x) ** 2).reshape(-1, block).sum(1) for v in (searched, plain)]

    e_search, e_plain = errors(rows["gaussian"])
    assert e_search.mean() < 0.96 * e_plain.mean() and (e_search <= e_plain).float().mean() > 0.75
    e_search, e_plain = errors(torch.cat([rows["heavy tails"], golden_weight(32, 512, 2)]))
    assert e_search.mean() < e_plain.mean() and (e_search <= e_plain).float().mean() > 0.5


@pytest.mark.parametrize("qtype", list(TYPES))
def test_bytes_of_llama_quantize(qtype):
    packed = quantize(golden_weight(256, 1024, 1), qtype)
    assert hashlib.sha256(packed.numpy().tobytes()).hexdigest() == LLAMA_CPP[qtype]


def _best_index(x: np.float32) -> int:
    """ggml's best_index_int8, transcribed: binary search, then the nearer neighbour, ties to the upper."""
    val = [np.float32(v) for v in IQ4_VALUES]
    if x <= val[0]:
        return 0
    if x >= val[-1]:
        return len(val) - 1
    lo, hi = 0, len(val) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < val[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - val[hi - 1]) < np.float32(val[hi] - x) else hi


def test_nearest_codebook_entry_as_ggml_picks_it():
    xs = []
    for a, b in pairwise(IQ4_VALUES):        # every midpoint and its fp32 neighbours
        v = np.float32((a + b) / 2)
        xs += [v, *(np.nextafter(v, np.float32(s * np.inf), dtype=np.float32) for s in (-1, 1))]
    xs += [np.float32(v) for v in IQ4_VALUES] + [np.float32(v) for v in (-1e30, 1e30, 0.0, -0.0, -127.5, 113.5)]
    xs += list(np.random.default_rng(0).uniform(-140, 130, 3000).astype(np.float32))
    ours = _nearest_code(torch.from_numpy(np.array(xs, dtype=np.float32))).tolist()
    assert ours == [_best_index(x) for x in xs]


def test_sqrt_is_correctly_rounded():
    v = torch.rand(100_000, generator=torch.Generator().manual_seed(5)) * 1e-3
    assert np.array_equal(_sqrt(v).numpy(), np.sqrt(v.numpy()))        # numpy's fp32 sqrt is IEEE's


def test_shapes_dtypes_and_refusals():
    w = golden_weight(6, 512, 3)
    stacked = w.reshape(3, 2, 512)                                      # experts (E, N, K)
    for qtype in ("q4_K", "iq4_nl", "q5_1"):
        packed = quantize(stacked, qtype)
        assert packed.shape == (3, 2, 512 // TYPES[qtype][0] * TYPES[qtype][1])
        assert torch.equal(packed.reshape(6, -1), quantize(w, qtype))
        assert torch.equal(quantize(w.to(torch.bfloat16), qtype), quantize(w.to(torch.bfloat16).float(), qtype))
        assert torch.equal(quantize(w, qtype, chunk_values=512), quantize(w, qtype))      # chunking is invisible
        threads = torch.get_num_threads()
        torch.set_num_threads(2)                                        # chunks spread over two threads
        try:
            assert torch.equal(quantize(w, qtype, chunk_values=512), quantize(w, qtype))
        finally:
            torch.set_num_threads(threads)
    assert canonical("Q4_K") == "q4_K" and canonical("IQ4_XS") == "iq4_xs"
    with pytest.raises(ValueError, match=r"multiple of 256, got shape \(4, 96\)"):
        quantize(torch.randn(4, 96), "q6_K")
    with pytest.raises(ValueError, match="unknown block type 'q7_K'"):
        quantize(w, "q7_K")
    bad = w.clone()
    bad[1, 300] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(bad, "q4_K")
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.zeros(2, 256, dtype=torch.int32), "q4_K")
