"""Checkpoints in both published formats, Mistral's consolidated one and Hugging Face's, and llama.cpp's GGUF.

- :func:`load_model`: a folder of either format -> a :class:`~sirocco.model.Transformer` (built on the meta
  device, tensors memory-mapped, checked by name and shape, converted at the boundary).
- :func:`load_quantized`: the same with each linear weight quantized (q8_0 / q4_0) as it is read, so the float
  model never exists whole, and the bytes before and after.
- :func:`read_state_dict`: the checked tensors in sirocco's names and layout, in their stored dtype.
- :func:`save_consolidated`, :func:`save_hf`: write either format.
- GGUF (gguf.py): :func:`load_model` also takes a ``.gguf`` file; :func:`save_gguf` writes one.
- ``config_files``: ``params.json`` and ``config.json`` read into ``ModelArgs`` and written from it.
- ``names``: the name mapping and the q/k permutation between the two layouts.
"""

from .files import CONSOLIDATED, HF, find_layout
from .gguf import GGUFFile, is_gguf, load_gguf, save_gguf
from .read import load_model, load_quantized, read_state_dict
from .save import save_consolidated, save_hf

__all__ = ["CONSOLIDATED", "HF", "GGUFFile", "find_layout", "is_gguf", "load_gguf", "load_model", "load_quantized",
           "read_state_dict", "save_consolidated", "save_gguf", "save_hf"]
