"""The sentencepiece vocabulary a GGUF file carries (``tokenizer.ggml.model`` = "llama"), both ways.

A GGUF file stores a sentencepiece model as parallel arrays (tokens, scores, token types) and a few ids and flags.
Reading, the exact route is to rebuild a sentencepiece ``ModelProto`` from them and hand it to sentencepiece
itself, so the file encodes and decodes as the model it came from. Writing, the arrays come from a
``tokenizer.model``'s proto.

What GGUF does not carry is filled in as Mistral's (and Llama's) sentencepiece models have it: a BPE model, the
identity normalizer, whitespace-only pieces allowed, byte fallback when the vocabulary has byte pieces (<0x00>...).
GGUF's token types use sentencepiece's own numbers (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import TokenizerError

log = logging.getLogger(__name__)

PAD_PIECE = "[PAD{}]"       # what llama.cpp's converter names the rows a vocabulary is padded with


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file."""
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int = -1
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True
    remove_extra_whitespaces: bool = False


def _pb2() -> Any:
    """sentencepiece's generated ModelProto module. It needs protobuf (a runtime dependency), at least the
    version it was generated with: a missing or older protobuf is reported as such, not as a traceback."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception as e:      # ImportError without protobuf; protobuf's VersionError when it is too old
        raise TokenizerError(f"GGUF vocabularies need sentencepiece's model proto, which did not load "
                             f"({type(e).__name__}: {e}); install a current protobuf: pip install -U protobuf"
                             ) from None
    return sentencepiece_model_pb2


def vocab_from_gguf(get: Callable[[str], Any], source: str) -> GGUFVocab:
    """The vocabulary from a GGUF file's fields; ``get(key)`` returns a field's value or None."""
    model = get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source}: no tokenizer in the file (metadata key 'tokenizer.ggml.model' missing)")
    if model != "llama":
        raise TokenizerError(f"{source}: tokenizer.ggml.model is {model!r}; sirocco reads sentencepiece "
                             "vocabularies ('llama')")
    fields = {}
    for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id"):
        value = get(f"tokenizer.ggml.{key}")
        if value is None:
            raise TokenizerError(f"{source}: missing metadata key 'tokenizer.ggml.{key}'")
        fields[key] = value
    n = len(fields["tokens"])
    if len(fields["scores"]) != n or len(fields["token_type"]) != n:
        raise TokenizerError(f"{source}: {n} tokens but {len(fields['scores'])} scores and "
                             f"{len(fields['token_type'])} token types")
    types = [int(t) for t in fields["token_type"]]
    unk = get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = types.index(2) if 2 in types else 0
    pad = get("tokenizer.ggml.padding_token_id")

    def flag(key: str, default: bool) -> bool:
        v = get(f"tokenizer.ggml.{key}")
        return default if v is None else bool(v)

    return GGUFVocab(list(fields["tokens"]), [float(s) for s in fields["scores"]], types,
                     int(fields["bos_token_id"]), int(fields["eos_token_id"]), int(unk),
                     -1 if pad is None else int(pad), flag("add_bos_token", True), flag("add_eos_token", False),
                     flag("add_space_prefix", True), flag("remove_extra_whitespaces", False))


def sentencepiece_proto(vocab: GGUFVocab) -> bytes:
    """A serialized sentencepiece ModelProto holding ``vocab`` (see the module docstring for what is assumed)."""
    pb = _pb2()
    proto = pb.ModelProto()
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types, strict=True):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(vocab.tokens)
    ts.byte_fallback = 6 in vocab.types
    ts.allow_whitespace_only_pieces = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id = vocab.unk_id, vocab.bos_id, vocab.eos_id
    ts.pad_id = vocab.pad_id if 0 <= vocab.pad_id < len(vocab.tokens) and vocab.pad_id not in (
        vocab.unk_id, vocab.bos_id, vocab.eos_id) else -1
    for attr, i in (("unk_piece", vocab.unk_id), ("bos_piece", vocab.bos_id), ("eos_piece", vocab.eos_id),
                    ("pad_piece", ts.pad_id)):
        if 0 <= i < len(vocab.tokens):
            setattr(ts, attr, vocab.tokens[i])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = vocab.add_space_prefix
    ns.remove_extra_whitespaces = vocab.remove_extra_whitespaces
    ns.escape_whitespaces = True
    return proto.SerializeToString()


def vocab_from_sentencepiece(model_file: str, vocab_size: int | None = None) -> GGUFVocab:
    """The GGUF fields of a sentencepiece ``tokenizer.model``, padded with unused ``[PADi]`` tokens up to
    ``vocab_size`` (the model's embedding rows) as llama.cpp's converter does."""
    pb = _pb2()
    proto = pb.ModelProto()
    try:
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:      # OSError or protobuf's DecodeError
        raise TokenizerError(f"{model_file}: not a readable sentencepiece model ({type(e).__name__}: {e})") from None
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise TokenizerError(f"{model_file} has {len(tokens)} pieces, more than the model's {vocab_size} "
                                 "embedding rows")
        for i in range(len(tokens), vocab_size):
            tokens.append(PAD_PIECE.format(i))
            scores.append(-1000.0)
            types.append(5)
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        log.warning("%s: normalizer %r is not kept in GGUF (llama.cpp does not normalize)", model_file, ns.name)
    if ts.model_type != pb.TrainerSpec.BPE:
        log.warning("%s: a sentencepiece %s model; GGUF's 'llama' tokenizer is read back as BPE", model_file,
                    pb.TrainerSpec.ModelType.Name(ts.model_type))
    return GGUFVocab(tokens, scores, types, ts.bos_id, ts.eos_id, ts.unk_id, ts.pad_id, True, False,
                     ns.add_dummy_prefix, ns.remove_extra_whitespaces)


def tokenizer_from_fields(get: Callable[[str], Any], path: Any) -> Any:
    """The sentencepiece tokenizer of a GGUF file's vocabulary fields (``get(key)``: a field's value or None; the
    reader, checkpoint/gguf_read.py, checks their types first)."""
    from .sentencepiece_model import SentencePieceTokenizer
    vocab = vocab_from_gguf(get, str(path))
    if not vocab.add_bos:
        log.warning("%s: tokenizer.ggml.add_bos_token is false; sirocco's verbs still put BOS in front of "
                    "prompts", path)
    tok = SentencePieceTokenizer(f"{path} (GGUF vocabulary)", model_proto=sentencepiece_proto(vocab))
    tok.kind = "sentencepiece from GGUF"
    return tok
