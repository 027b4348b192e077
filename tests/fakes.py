"""Test doubles."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 <unk>, 1 <s>, 2 </s>, byte b -> b + 3. Multi-byte characters span tokens,
    as with sentencepiece's byte fallback, so streaming has to wait for complete characters."""

    vocab_size = 259
    bos_id = 1
    eos_id = 2

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
