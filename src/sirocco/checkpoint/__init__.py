"""Checkpoints in both published formats, Mistral's consolidated one and Hugging Face's, and llama.cpp's GGUF.

- :func:`load_model`: a folder of either format or a ``.gguf`` file -> a :class:`~sirocco.model.Transformer` on a
  backend (``read_model`` reads, ``backends.attach`` converts: tensors memory-mapped, checked by name and shape,
  converted at the boundary; quantized as they are read where asked, so the float model never exists whole).
- :func:`load_quantized`: the same with the quantization report (bytes before and after).
- :func:`read_state_dict`: the checked tensors in sirocco's names and layout, in their stored dtype.
- :func:`save_consolidated`, :func:`save_hf`: write either format; ``gguf_write.save_gguf`` writes a GGUF file
  (imported from its module: the ``gguf`` package it needs is slow to import, and only writing needs it).
- GGUF reading: ``gguf_header`` (the container, checked as untrusted input), ``gguf_read`` (:class:`GGUFFile`).
- ``config_files``: ``params.json`` and ``config.json`` read into ``ModelArgs`` and written from it.
- ``names``: the name mappings (Hugging Face, GGUF) and the q/k permutation between the layouts.
"""

from .files import CONSOLIDATED, HF, find_layout
from .gguf_read import GGUFFile, is_gguf
from .read import ModelParts, load_model, load_quantized, read_model, read_state_dict
from .save import save_consolidated, save_hf

__all__ = ["CONSOLIDATED", "HF", "GGUFFile", "ModelParts", "find_layout", "is_gguf", "load_model", "load_quantized",
           "read_model", "read_state_dict", "save_consolidated", "save_hf"]
