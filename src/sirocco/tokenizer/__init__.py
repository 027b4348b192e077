"""Tokenizers: Mistral's own files (tekken.json, tokenizer.model.vN) through mistral-common, a plain
sentencepiece ``tokenizer.model``, or a Hugging Face ``tokenizer.json``, all behind one interface:

    tok = load_tokenizer("path/to/model-folder")    # or a tokenizer file; search order in find.py
    ids = tok.encode("Hello", bos=True, eos=False)  # [1, 23325]
    tok.decode(ids)                                 # "Hello"; safe on any slice of a sequence (base.py)
    tok.encode_chat([{"role": "user", "content": "Hi"}])   # Mistral's instruct format (chat.py)
    tok.bos_id, tok.eos_id, tok.vocab_size, tok.source
"""

from ..errors import TokenizerError
from .base import Tokenizer
from .find import find_tokenizer_files, load_tokenizer, open_tokenizer_file

__all__ = ["Tokenizer", "TokenizerError", "find_tokenizer_files", "load_tokenizer", "open_tokenizer_file"]
