"""Quantized weights: GGUF's q8_0 and q4_0 blocks (formats.py), decode kernels over them (kernels.py, csrc/) and
a linear layer holding them (linear.py)."""
from sirocco.backends.quant.formats import (BLOCK, FORMATS, QuantizedTensor, block_bytes, dequantize,
                                            packed_shape, quantize, unpack)

__all__ = ["BLOCK", "FORMATS", "QuantizedTensor", "block_bytes", "dequantize", "packed_shape", "quantize", "unpack"]
