"""Quantized weights: GGUF's q8_0 and q4_0 blocks (formats.py), decode kernels over them (kernels.py, csrc/), a
linear layer holding them (linear.py), and the quantize-at-load pass ``attach(model, fmt)`` (convert.py)."""
from sirocco.backends.quant.convert import QuantReport, attach, attach_if, layer_format, resolve
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

__all__ = ["BLOCK", "FORMATS", "QuantReport", "QuantizedTensor", "attach", "attach_if", "block_bytes", "dequantize",
           "layer_format", "packed_shape", "quantize", "resolve", "unpack"]
