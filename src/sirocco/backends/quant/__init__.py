"""Quantized weights: GGUF's q8_0 and q4_0 blocks (formats.py), decode kernels over them (kernels.py, csrc/), a
linear layer holding them (linear.py), and the conversion pass's steps for them (convert.py; the pass itself is
``backends.attach(model, backend, quantize=...)``)."""
from sirocco.backends.quant.convert import HEAD_FORMAT, QuantReport, empty_blocks, layer_format, resolve
from sirocco.backends.quant.formats import (
                                            BLOCK,
                                            FORMATS,
                                            QuantizedTensor,
                                            block_bytes,
                                            dequantize,
                                            packed_shape,
                                            quantize,
                                            unpack,
)

__all__ = ["BLOCK", "FORMATS", "HEAD_FORMAT", "QuantReport", "QuantizedTensor", "block_bytes", "dequantize",
           "empty_blocks", "layer_format", "packed_shape", "quantize", "resolve", "unpack"]
