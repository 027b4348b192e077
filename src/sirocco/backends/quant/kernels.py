"""Decode products over quantized weights: ``qlinear(x (M, K), packed (N, K // values * bytes), fmt) -> (M, N)``.

A decode step multiplies one to eight activation rows by every weight matrix, so it is bound by how fast the
weights are read; q8_0 reads 34 bytes per 32 weights, q4_K 144 per 256, against 64 per 32 for bf16. The C++
kernels of csrc/ (built at run time by torch.utils.cpp_extension on CPUs with AVX2 or AVX-512, cached on disk by
PyTorch) serve every type of layouts.py: they quantize the activation rows once per call to int8 blocks with an
fp32 scale (``quantize_activations``: blocks of 32 for the 32-value types, of 256 for the K types and iq4_xs),
take integer dot products (per block, or per super-block with the integer sub-block scales applied) and sum
``float(dot) * (d_w * d_a)`` (and the types' min or offset terms) over the blocks in order, in fp32; csrc/qlinear.cpp
and csrc/qlinear_k.cpp state each type's arithmetic. Their AVX2 and AVX512-VNNI paths give the same bits, and an
output's bits do not depend on how many rows are multiplied together.

``qlinear_reference`` is the plain PyTorch product of the dequantized weights with the same int8-quantized
activations (fp32 matmul; equal to the kernel to fp32 rounding, not bit for bit): the path where no C++ kernel can
be built, and on CUDA.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sirocco.backends.quant.formats import QuantizedTensor, round_half_away
from sirocco.backends.quant.interleave import deinterleave
from sirocco.backends.quant.layouts import TYPES, block_values, dequantize, packed_shape

log = logging.getLogger(__name__)

MAX_ROWS = 8                                   # the kernel's largest row count
FMT_CODES = {fmt: code for code, fmt in enumerate(TYPES)}    # csrc/blocks.h's codes
ISA_CODES = {"auto": 0, "avx2": 1, "avx512vnni": 2}
LAYOUT_CODES = {"file": 0, "interleaved": 1}     # how a weight's blocks are laid out in memory (interleave.py)
DEQUANT_ISA_CODES = {"auto": 0, "avx2": 1, "avx512bf16": 2}

_module = None
_failed = False
CFLAGS = ["-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


# One translation unit: blocks.h's format codes first; qlinear_k.cpp (the 256-value types) uses qlinear.cpp's
# activations and vector operations; qmoe.cpp (a MoE layer's experts in one call) their tiles and the backends'
# shared moe_plan.h; dequantize.cpp (pre-fill's tiles) the block constants and scale unpacking.
_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "blocks.h", _CSRC / "qlinear.cpp", _CSRC / "qlinear_k.cpp", _CSRC / "qlinear_x16.cpp",
           Path(__file__).parents[1] / "csrc" / "moe_plan.h", _CSRC / "qmoe.cpp", _CSRC / "dequantize.cpp")


def _build(name: str, defines: tuple[str, ...] = ()) -> Any:
    from torch.utils.cpp_extension import load_inline
    sources = [f.read_text() for f in SOURCES]
    # The name carries a digest of the sources: PyTorch's build cache is one folder per name, shared by every
    # process of the user, so two versions of the sources built at once would otherwise overwrite each other.
    digest = hashlib.sha1("\0".join(sources + list(defines)).encode()).hexdigest()[:12]
    return load_inline(f"{name}_{digest}", cpp_sources=sources,
                       functions=["qlinear", "qlinear_many", "qlinear_layout", "qlinear_many_layout",
                                  "quantize_activations", "qlinear_isa", "qmoe", "qmoe_layout", "dequantize_into",
                                  "dequantize_into_layout"],
                       extra_cflags=CFLAGS + [f"-D{d}" for d in defines], extra_ldflags=["-fopenmp"])


def native_module() -> Any:
    """The built C++ module (``qlinear``, ``qlinear_many``, ``quantize_activations``, ``qlinear_isa``, ``qmoe``,
    ``dequantize_into``), or None where the CPU has neither AVX2 nor AVX-512 or building fails (said once in the
    log)."""
    global _module, _failed
    if _module is None and not _failed:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            _failed = True
            log.info("no AVX2 on this CPU: the quantized decode kernels are not used")
            return None
        try:
            t0 = time.perf_counter()
            log.info("preparing the quantized decode kernels (a build of about a minute the first time, then "
                     "cached by PyTorch)")
            _module = _build("sirocco_quant_kernels")
            log.info("quantized decode kernels ready in %.1f s (%s)", time.perf_counter() - t0, _module.qlinear_isa())
        except Exception as e:          # no compiler, no ninja, old compiler: keep working, say why once
            _failed = True
            log.warning("quantized decode kernels unavailable (%s: %s); using dequantize + matmul",
                        type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
            return None
    return _module


def vnni_emulation_module() -> Any:
    """A test-only build of the same source whose AVX512-VNNI path runs on scalar emulations of its 512-bit
    operations (qlinear's isa="avx512vnni" works on any AVX2 CPU): checks the VNNI tile's data flow where the
    instructions are missing. A separate build of about a minute, cached like the other."""
    return _build("sirocco_quant_kernels_vnni_emulation", ("SIROCCO_VNNI_EMULATION",))


def kernel_available() -> bool:
    return native_module() is not None


def activation_block(fmt: str) -> int:
    """The block length the kernels quantize activations in for weights of ``fmt``: 32 for the 32-value types,
    256 for the others (llama.cpp's q8_K blocks)."""
    return block_values(fmt)


def quantize_activations(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x (M, K) -> (q int8 (M, K), d fp32 (M, K // block)) with x ~ q * d per block of ``block`` (32 or 256),
    bit for bit as the kernels quantize them: ``d = max|x| / 127`` (kept in fp32), ``q = round(x * (1/d))`` ties
    away from zero; a block whose d is not a normal fp32 (all zeros, or tiny) gets d = 0 and q = 0. The kernels of
    the 256-value types also use the sums of each 16 quants (``q.reshape(M, -1, 16).sum(-1)``)."""
    if block not in (32, 256):
        raise ValueError(f"activations: blocks of 32 or 256 values, got {block}")
    if x.shape[-1] % block:
        raise ValueError(f"activations: K must be a multiple of {block}, got shape {tuple(x.shape)}")
    blocks = x.detach().to(torch.float32).reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1)
    d = amax / torch.full_like(amax, 127.0)
    normal = d >= torch.finfo(torch.float32).tiny
    d = torch.where(normal, d, torch.zeros_like(d))
    inv = torch.where(normal, torch.ones_like(d) / torch.where(normal, d, torch.ones_like(d)), torch.zeros_like(d))
    q = round_half_away(blocks * inv[..., None]).to(torch.int8)
    return q.reshape(x.shape), d


def _unwrap(packed: torch.Tensor | QuantizedTensor, fmt: str | None) -> tuple[torch.Tensor, str]:
    if isinstance(packed, QuantizedTensor):
        return packed.data, packed.fmt
    if fmt is None:
        raise ValueError("qlinear: give fmt with a packed tensor")
    return packed, fmt


def interleaving_pays() -> bool:
    """Whether weights should be interleaved here (interleave.py): where the kernels run their AVX512-VNNI path,
    the only one that reads the interleaved layout."""
    module = native_module()
    return module is not None and module.qlinear_isa() == "avx512vnni"


def layout_code(layout: str) -> int:
    """The kernels' code of a blocks' layout (LAYOUT_CODES), an unknown name refused as such."""
    if layout not in LAYOUT_CODES:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_CODES)}")
    return LAYOUT_CODES[layout]


def file_layout(data: torch.Tensor, fmt: str, layout: str) -> torch.Tensor:
    """The blocks of ``data`` in the file's layout: ``data`` itself, or a de-interleaved copy."""
    return data if layout_code(layout) == 0 else deinterleave(data, fmt)


def _decode_module(x: torch.Tensor) -> Any:
    """The C++ module where it serves these activation rows (a decode step: CPU, 1..MAX_ROWS rows, fp32 or bf16),
    else None."""
    if x.device.type != "cpu" or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native_module()


def qlinear_reference(x: torch.Tensor, packed: torch.Tensor | QuantizedTensor,
                      fmt: str | None = None) -> torch.Tensor:
    """The plain PyTorch product: dequantized weights times the int8-quantized activations (``quantize_activations``)
    in fp32, for any number of rows, on any device; returns (M, N) in x's dtype."""
    data, fmt = _unwrap(packed, fmt)
    k = x.shape[-1]
    n = data.shape[0]
    w = dequantize(data, fmt, (n, k))
    block = activation_block(fmt)
    q, d = quantize_activations(x, block)
    xa = (q.to(torch.float32).reshape(*x.shape[:-1], -1, block) * d[..., None]).reshape(x.shape)
    return (xa @ w.T).to(x.dtype)


def qlinear(x: torch.Tensor, packed: torch.Tensor | QuantizedTensor, fmt: str | None = None,
            isa: str = "auto", layout: str = "file") -> torch.Tensor:
    """y (M, N) in x's dtype = x (M, K) (fp32 or bf16, M in 1..8) times the quantized weight (N, K) held as packed
    GGUF blocks (uint8 (N, K // values * bytes)) of format ``fmt`` (a type of layouts.py: "q8_0", "q4_K", ...).

    The C++ kernel where it is built and x is on CPU; otherwise ``qlinear_reference``. ``isa`` ("auto", "avx2",
    "avx512vnni") forces a path of the kernel, for tests on machines that have both. ``layout`` says how the
    blocks are laid out: "file" (GGUF's rows), or "interleaved" (interleave.py; read by the AVX512-VNNI path
    only)."""
    data, fmt = _unwrap(packed, fmt)
    if data.dim() != 2 or x.dim() != 2 or tuple(data.shape) != packed_shape((data.shape[0], x.shape[1]), fmt):
        raise ValueError(f"qlinear: rows {tuple(x.shape)} do not match {fmt} blocks {tuple(data.shape)}")
    module = _decode_module(x)
    if module is None or data.device.type != "cpu":
        return qlinear_reference(x, file_layout(data, fmt, layout), fmt)
    return module.qlinear_layout(x, data.contiguous(), FMT_CODES[fmt], ISA_CODES[isa], layout_code(layout))


def qlinear_many(x: torch.Tensor, packed: list[torch.Tensor], fmt: str, isa: str = "auto", layout: str = "file"
                 ) -> list[torch.Tensor] | None:
    """[x @ W_i^T for each packed weight W_i] in one C++ call (the projections that share an input: a layer's wq,
    wk, wv, or w1, w3): x (M, K) fp32 or bf16, M in 1..8, quantized once; each output has the bits ``qlinear``
    gives it alone. None where the kernel is not built or x is not on CPU."""
    module = _decode_module(x)
    if module is None:
        return None
    return module.qlinear_many_layout(x, packed, FMT_CODES[fmt], ISA_CODES[isa], layout_code(layout))


def dequantize_into(packed: torch.Tensor, fmt: str, out: torch.Tensor, isa: str = "auto",
                    layout: str = "file") -> torch.Tensor:
    """``out`` (N, K) fp32 or bf16 = the weights of the packed blocks (N, K // values * bytes): the bits of
    ``layouts.dequantize`` (in bf16, those values rounded to nearest even, as ``.to(torch.bfloat16)`` rounds), in
    one C++ pass where the kernels are built and everything is on CPU, else through ``layouts.dequantize``.
    Pre-fill's tiles (linear.py) reuse one buffer this way. ``isa`` ("auto", "avx2", "avx512bf16") forces a path
    of the bf16 pass, for tests; ``layout`` is the blocks' ("file" or "interleaved", as ``qlinear``'s)."""
    module = native_module() if packed.device.type == "cpu" and out.device.type == "cpu" else None
    if module is None or not (packed.is_contiguous() and out.is_contiguous()
                              and out.dtype in (torch.float32, torch.bfloat16)):
        return out.copy_(dequantize(file_layout(packed, fmt, layout), fmt, tuple(out.shape)))
    module.dequantize_into_layout(packed, FMT_CODES[fmt], out, DEQUANT_ISA_CODES[isa], layout_code(layout))
    return out


def qmoe(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, q1: torch.Tensor, q3: torch.Tensor,
         q2: torch.Tensor, fmt: str, isa: str = "auto", layout: str = "file") -> torch.Tensor | None:
    """A MoE layer's experts for a decode step in one call (csrc/qmoe.cpp): x (T, D) fp32 or bf16, chosen and
    weights (T, k) (expert ids, and their weights in x's dtype), q1 / q3 (E, H, D // values * bytes) and q2
    (E, D, H // values * bytes) the experts' ``fmt`` blocks stacked (each expert's rows contiguous, read in place).
    Returns (T, D) in x's dtype, the bits of the per-expert QuantLinear path; None where the kernel is not built
    or x is not on CPU. ``layout``: every expert's blocks "file" or "interleaved" (each expert by itself)."""
    module = _decode_module(x)
    if module is None:
        return None
    return module.qmoe_layout(x, chosen, weights.to(x.dtype), q1, q3, q2, FMT_CODES[fmt], ISA_CODES[isa],
                              layout_code(layout))
