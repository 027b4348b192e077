"""Quantized weights: GGUF's block types (formats.py for q8_0 and q4_0, layouts.py for every type), their
quantizers (quantizers.py), which tensor gets which type in a mix (mixes.py), decode kernels over them
(kernels.py, csrc/), a linear layer holding them (linear.py), and the conversion pass's steps for them
(convert.py; the pass itself is ``backends.attach(model, backend, quantize=...)``)."""
from sirocco.backends.quant.convert import QUANTIZE, QuantReport, empty_blocks, layer_type, quantize_weight, resolve
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

__all__ = ["BLOCK", "FORMATS", "QUANTIZE", "QuantReport", "QuantizedTensor", "block_bytes", "dequantize",
           "empty_blocks", "layer_type", "packed_shape", "quantize", "quantize_weight", "resolve", "unpack"]
