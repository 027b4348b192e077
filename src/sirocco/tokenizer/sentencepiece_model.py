"""A plain sentencepiece model (``tokenizer.model``): what a Hugging Face Mistral folder ships and what
``sirocco train-tokenizer`` writes. Read with sentencepiece itself, the reference for these files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import TokenizerError
from .base import Tokenizer, TokenVocab, first_line, sentencepiece_vocab


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path | str, model_proto: Optional[bytes] = None):
        """From a ``tokenizer.model`` file, or from a serialized ModelProto (``model_proto``; ``path`` then names
        where it came from, for logs and errors)."""
        import sentencepiece

        self.source = str(path)
        try:
            if model_proto is not None:
                self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
            else:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path}: not a readable sentencepiece model ({first_line(e)})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no BOS or EOS piece (bos_id "
                                 f"{self.bos_id}, eos_id {self.eos_id}); sirocco needs both")
        self.vocab_size = self.sp.get_piece_size()
        inst = [self.sp.piece_to_id(p) for p in ("[INST]", "[/INST]")]
        if all(self.sp.IsControl(i) for i in inst):   # unknown pieces map to <unk>, which is not a control piece
            self.inst_ids = (inst[0], inst[1])
        self._setup()

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_vocab(self) -> TokenVocab:
        return sentencepiece_vocab(self.sp)
