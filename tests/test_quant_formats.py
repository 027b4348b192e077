"""GGUF block formats: sirocco's torch (de)quantizers against the gguf package's reference ones, bit for bit, on
random blocks and on blocks chosen to hit every rounding edge."""

import warnings

import numpy as np
import pytest
import torch

from sirocco.backends.quant.formats import (QuantizedTensor, block_bytes, dequantize, packed_shape, quantize,
                                            round_half_away, unpack)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402

QTYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
FMTS = list(QTYPE)
F32 = torch.finfo(torch.float32)


def gguf_quantize(w: torch.Tensor, fmt: str) -> np.ndarray:
    with warnings.catch_warnings():            # overflow / invalid casts of the adversarial blocks
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return gguf.quants.quantize(w.float().numpy(), QTYPE[fmt])


def gguf_dequantize(packed: np.ndarray, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(packed, QTYPE[fmt])


def _block(values, fill=0.0) -> torch.Tensor:
    b = torch.full((32,), fill)
    b[:len(values)] = torch.tensor(values, dtype=torch.float32)
    return b


def adversarial_blocks() -> dict[str, torch.Tensor]:
    """Named (B, 32) fp32 blocks at the edges of both quantizers."""
    g = torch.Generator().manual_seed(1)
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    out = {
        "zeros": torch.zeros(1, 32),
        "negative zeros": torch.full((1, 32), -0.0),
        "one huge value": torch.cat([torch.tensor([1e4]), torch.randn(31, generator=g) * 1e-3])[None],
        "one huge negative": torch.cat([torch.randn(31, generator=g), torch.tensor([-1e30])])[None],
        "negative extremes": torch.tensor([[-F32.max] + [F32.max] * 31]),
        "all float max": torch.full((1, 32), F32.max),
        "scale overflows fp16": torch.randn(2, 32, generator=g) * 1e7,
        "all -1": -torch.ones(1, 32),
        "equal magnitudes, negative first": torch.tensor([[-1.0] + [1.0] * 31]),
        "equal magnitudes, positive first": torch.tensor([[1.0] + [-1.0] * 31]),
        "alternating signs": torch.tensor([[(-1.0) ** i * (i + 1) / 7 for i in range(32)]]),
        "linspace": torch.linspace(-1, 1, 32)[None],
        # q8_0: max 127 gives d = 1, so x / d = k + 0.5 exactly: ties, rounded away from zero
        "q8_0 ties": _block([127.0] + [k + 0.5 for k in range(-15, 15)] + [-0.5])[None],
        "q8_0 just below ties": _block([127.0] + [k + below_half for k in range(0, 31)])[None],
        # q4_0: max -8 gives d = 1, so x / d + 8.5 lands on integers (x = k + 0.5) or just below
        "q4_0 ties": _block([-8.0] + [k + 0.5 for k in range(-8, 7)] + [-0.5, 0.5])[None],
        "q4_0 just below ties": _block([-8.0] + [k + below_half for k in range(-8, 7)])[None],
        "q4_0 positive max": _block([8.0] + [k + 0.5 for k in range(-8, 7)])[None],
        # scales below fp16's normal range (stored as fp16 subnormals or zero)
        "fp16-subnormal scales": torch.randn(4, 32, generator=g) * 1e-5,
        "scales underflowing fp16": torch.randn(4, 32, generator=g) * 1e-7,
        # fp32 subnormal inputs: 1/d overflows to inf, so x * (1/d) is inf or nan and both quantizers cast it
        "fp32 subnormal values": torch.randn(4, 32, generator=g) * 1e-39,
        "smallest subnormal": torch.full((1, 32), 1.4e-45),
        "one subnormal among zeros": _block([0.0] * 7 + [1e-44])[None],
        "mixed magnitudes": torch.randn(500, 32, generator=g) * torch.rand(500, 1, generator=g).pow(8) * 100,
    }
    return out


# Blocks where sirocco's quantizer is known to differ from gguf's (fmt, block name) -> reason. Empty: none found.
# (The fp32-subnormal blocks agree here because both sides cast inf/nan to integers the same way on x86.)
EXPECTED_DIFFERENCES: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_matches_gguf_on_random_weights(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32 * 7, generator=g) * torch.rand(48, 1, generator=g) * 3
    assert torch.equal(quantize(w, fmt), torch.from_numpy(gguf_quantize(w, fmt)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("name", list(adversarial_blocks()))
def test_quantize_matches_gguf_on_adversarial_blocks(fmt, name):
    blocks = adversarial_blocks()[name]
    ours, theirs = quantize(blocks, fmt).numpy(), gguf_quantize(blocks, fmt)
    differ = (ours != theirs).any(-1)
    if (fmt, name) in EXPECTED_DIFFERENCES:
        assert differ.any(), f"listed as different but now equal: {EXPECTED_DIFFERENCES[fmt, name]}"
    else:
        assert not differ.any(), (blocks[differ][:2], ours[differ][:2], theirs[differ][:2])


def test_rounding_edges_round_as_documented():
    """A direct check of the intended rounding (not only agreement with gguf): ties away from zero for q8_0,
    x/d + 8.5 truncated for q4_0."""
    q8 = quantize(adversarial_blocks()["q8_0 ties"], "q8_0")[0, 2:].view(torch.int8)
    assert q8[1:].tolist() == [k + 1 if k >= 0 else k for k in range(-15, 15)] + [-1]
    assert round_half_away(torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49999997])).tolist() == [1, -1, 2, -3, 0]
    q4, _ = unpack(quantize(adversarial_blocks()["q4_0 ties"], "q4_0"), "q4_0")
    assert q4[0, 0, 1:16].tolist() == [k + 1 for k in range(-8, 7)]        # k + 0.5 -> k + 1 (ties go up)
    assert q4[0, 0, 16:18].tolist() == [0, 1]


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_matches_gguf_bit_for_bit(fmt):
    g = torch.Generator().manual_seed(2)
    blocks = torch.cat([torch.randn(64, 32, generator=g), *adversarial_blocks().values()])
    blocks = blocks[:, None, :].expand(-1, 2, -1).reshape(-1, 64)[: (len(blocks) // 2) * 2]  # rows of 2 blocks
    packed = gguf_quantize(blocks, fmt)
    # also random bytes: every bit pattern of scale and quants, inf/nan scales included
    noise = torch.randint(0, 256, (40, packed.shape[1]), dtype=torch.uint8, generator=g).numpy()
    for data in (packed, noise):
        theirs = gguf_dequantize(data, fmt)
        ours = dequantize(torch.from_numpy(data), fmt, theirs.shape).numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("fmt", FMTS)
def test_layout_and_shapes(fmt):
    w = torch.randn(3, 5, 64)                                  # stacked experts (E, N, K)
    packed = quantize(w.to(torch.bfloat16), fmt)
    assert packed.shape == (3, 5, 2 * block_bytes(fmt)) == packed_shape(w.shape, fmt)
    assert torch.equal(packed, torch.from_numpy(gguf_quantize(w.to(torch.bfloat16), fmt)))
    qt = QuantizedTensor.from_float(w, fmt)
    assert qt.nbytes == 3 * 5 * 2 * block_bytes(fmt) and qt.dequantize().shape == w.shape
    assert (qt.dequantize() - w).abs().max() <= w.abs().max() / (7 if fmt == "q4_0" else 100)


def test_q4_0_nibble_order():
    """Byte j holds element j (low nibble) and element j + 16 (high nibble)."""
    x = _block([-8.0] + list(range(-7, 8)) + [0.0] * 16)           # d = 1: nibble = value + 8
    x[16:] = torch.arange(7, -9, -1, dtype=torch.float32)
    qs = quantize(x[None], "q4_0")[0, 2:]
    nibbles = (x + 8).to(torch.uint8)
    assert torch.equal(qs & 0x0F, nibbles[:16]) and torch.equal(qs >> 4, nibbles[16:])


@pytest.mark.parametrize("fmt", FMTS)
def test_k_not_a_multiple_of_32_is_refused(fmt):
    with pytest.raises(ValueError, match=r"\(4, 48\)"):
        quantize(torch.randn(4, 48), fmt)
    with pytest.raises(ValueError, match="multiple"):
        QuantizedTensor(torch.zeros(4, 10, dtype=torch.uint8), fmt, (4, 40))
