"""Training a sentencepiece BPE tokenizer with the conventions of Mistral's tokenizers.

    id 0 <unk>, id 1 <s> (BOS), id 2 </s> (EOS), no padding token; then the 256 byte pieces <0x00>..<0xFF>
    (byte fallback: any text encodes, a character never seen becomes its UTF-8 bytes), then the merges.

Like Mistral's (and Llama's) models: digits are split one by one, text is not normalised (code keeps its
spaces), runs of spaces may become pieces (indentation), and a space is prefixed to the text. Newlines are not
pieces: they encode as the byte <0x0A>.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

from ..errors import SiroccoError

log = logging.getLogger(__name__)

SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
MIN_VOCAB_SIZE = len(SPECIALS) + 256 + 1     # the specials, the 256 byte pieces and one merge
MAX_LINE = 8192          # longer lines are cut into pieces of this many characters for training


def _lines(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            while line:
                yield line[:MAX_LINE]
                line = line[MAX_LINE:]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path, character_coverage: float = 0.9995,
                    threads: int = 1) -> Path:
    """Train a BPE model of ``vocab_size`` pieces on ``texts`` and write it to ``out`` (a ``tokenizer.model``).

    The pieces are learnt from the texts' lines. One thread (the default) makes the result the same from run
    to run. Returns the written path."""
    import sentencepiece as spm
    out = Path(out)
    minimum = MIN_VOCAB_SIZE
    if vocab_size < minimum:
        raise SiroccoError(f"vocab_size must be at least {minimum} (3 special tokens, 256 bytes and one "
                           f"merge), got {vocab_size}")
    lines = [line for line in _lines(texts) if line.strip()]
    if not lines:
        raise SiroccoError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, character_coverage=character_coverage, max_sentence_length=MAX_LINE * 4,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=threads, minloglevel=2,
            hard_vocab_limit=True)
    except RuntimeError as e:
        # sentencepiece's messages say what is wrong (e.g. a vocabulary too large for the text); keep them.
        raise SiroccoError(f"sentencepiece could not train a {vocab_size}-piece model: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    log.info("trained a %d-piece BPE tokenizer on %d lines; wrote %s", vocab_size, len(lines), out)
    return out



def tokenizer_file(path: str | Path) -> Path:
    """The file a tokenizer is read from: ``path`` itself, or the file ``sirocco.tokenizer`` picks in a folder
    (copied next to a trained model so that its folder is complete)."""
    from ..tokenizer import find_tokenizer_files
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer_files(path)
        if not found:
            raise SiroccoError(f"no tokenizer in {path}")
        return found[0]
    return path
