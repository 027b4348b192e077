"""Reading a GGUF file, the third checkpoint format (llama.cpp's: config, tokenizer and tensors in one file).

``GGUFFile(path)`` reads and checks the container (gguf_header.py: the file is untrusted input), then gives:

- ``args()``: the ``ModelArgs`` of the ``llama.*`` metadata (Mistral and Mixtral files, as llama.cpp writes them);
- ``read(...)``: the model's weights as a ``GGUFWeights``: float tensors by sirocco name (F32, F16, BF16;
  converted to the dtype asked, or left memory-mapped where used as stored) and the blocks of its quantized
  linear weights by module path, in any block type of backends/quant/layouts.py (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
  IQ4_NL, Q2_K to Q6_K, IQ4_XS: every type llama.cpp's standard mixes write), byte for byte with no
  re-quantization: on CPU read once into huge-page memory (backends/quant/hugepages.py), where decode reads them
  faster than from the file's mapping, elsewhere copied to the device. A quantized embedding or router is
  dequantized (sirocco keeps those in float). Mixtral's stacked experts (``blk.i.ffn_gate_exps`` of shape
  (E, N, K)) give each expert a row of one buffer;
- ``tokenizer()``: the sentencepiece tokenizer of its vocabulary (tokenizer/gguf_vocab.py).

Nothing here builds or replaces a module: the loader (read.py) builds the model from the float tensors and the
conversion pass (``backends.attach``) puts ``QuantLinear`` over the blocks. Every tensor's name, type and shape
is checked against the metadata before any tensor data is read, and every problem of the file is a
``ModelFileError`` naming the file and what is wrong (the CLI exits 2).

Row layout of wq/wk: llama.cpp's converter permutes Hugging Face's rows back to the interleaved pairs of Mistral's
consolidated weights, which is sirocco's internal layout: no permutation here (checked against the converter's
output, see the tests). Names: ``names.GGUF_NAMES``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..backends.quant.convert import dequantize_rows
from ..backends.quant.formats import QuantizedTensor
from ..backends.quant.hugepages import huge_page_tensors
from ..backends.quant.layouts import LAYOUTS
from ..config import ModelArgs, MoeArgs
from ..errors import ConfigError, ModelFileError, TokenizerError
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..tokenizer.gguf_vocab import tokenizer_from_fields
from .gguf_header import GGUFHeader, StringArray, TensorInfo, read_header
from .names import from_gguf_name

log = logging.getLogger(__name__)

ARCH = "llama"
SUFFIX = ".gguf"
QUANT_FORMATS = {name.upper(): name for name in LAYOUTS}          # GGUF's Q4_K -> layouts' q4_K
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Kept in float even where the file quantizes them: the embedding (a table lookup) and the MoE router (small, and
# a change in its logits changes which experts run).
FLOAT_ONLY = ("tok_embeddings.weight", "feed_forward.gate.weight")
_REQUIRED = object()


def is_gguf(path: str | Path) -> bool:
    """A ``.gguf`` file (by name; the reader checks the magic)."""
    p = Path(path)
    return p.suffix.lower() == SUFFIX and p.is_file()


def f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips in float32 (1e-5 stays 1e-05, not
    9.999999747378752e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


@dataclass
class Entry:
    """Where one sirocco tensor is in the file: a GGUF tensor, or row ``expert`` of a stacked one."""

    info: TensorInfo
    expert: Optional[int] = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape[1:] if self.expert is not None else self.info.shape

    def describe(self) -> str:
        return self.info.name + ("" if self.expert is None else f"[{self.expert}]")


@dataclass
class GGUFWeights:
    """What ``GGUFFile.read`` gives: the config, float tensors by sirocco name (``tok_embeddings.weight``), and the
    quantized linear weights' blocks by module path (``layers.0.attention.wq``)."""

    args: ModelArgs
    state: dict[str, torch.Tensor]
    blocks: dict[str, QuantizedTensor]
    types: dict[str, int] = field(default_factory=dict)      # tensors read, by GGUF type
    dequantized: list[str] = field(default_factory=list)      # quantized in the file, float in sirocco
    embedding_type: Optional[str] = None                      # the block type the embedding was dequantized from


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model of ``args`` with its shape, in the model's order, without building the
    model: the shapes come from a one-layer model with one expert on the meta device (a layer's tensors do not
    depend on its index; the router has a row per expert), so a file claiming a huge layer or expert count builds
    nothing before its tensors are checked."""
    moe = args.moe
    one = args.replace(n_layers=1, sliding_window=None, moe=None if moe is None else MoeArgs(1, 1))
    try:
        with torch.device("meta"):
            template = [(n, tuple(t.shape)) for n, t in Transformer(one).state_dict().items()]
    except RuntimeError as err:            # sizes whose products overflow, even on the meta device
        raise ConfigError(f"no model of these sizes can be built: {err}") from None
    layer = [(n.removeprefix("layers.0."), s) for n, s in template if n.startswith("layers.0.")]
    expert = [(rest, s) for rest, s in layer if ".experts.0." in rest]       # one expert's, contiguous
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in template:
        if name.startswith("layers.0."):
            continue
        if name == "norm.weight":               # after the layers, as the model lists them
            for i in range(args.n_layers):
                for rest, s in layer:
                    if moe is not None and rest == "feed_forward.gate.weight":
                        s = (moe.num_experts, *s[1:])
                    if ".experts.0." not in rest:
                        out[f"layers.{i}.{rest}"] = s
                    elif rest == expert[0][0]:
                        for e in range(moe.num_experts if moe is not None else 0):
                            for one_expert, expert_shape in expert:
                                out[f"layers.{i}.{one_expert.replace('.experts.0.', f'.experts.{e}.')}"] = \
                                    expert_shape
        out[name] = shape
    return out


def stage_names(names: list[str], layers: Optional[list[int]], embed: bool, head: bool) -> list[str]:
    """The names of ``names`` that the stage ``Transformer(args, layers=layers, embed=embed, head=head)`` holds."""
    keep = None if layers is None else {str(i) for i in layers}

    def held(name: str) -> bool:
        if name.startswith("layers."):
            return keep is None or name.split(".", 2)[1] in keep
        if name == "tok_embeddings.weight":
            return embed
        return head                              # norm, output
    return [n for n in names if held(n)]


class GGUFFile:
    """A GGUF file opened once: its metadata, model config, tokenizer and tensors (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header: GGUFHeader = read_header(self.path)
        self.tensors: dict[str, TensorInfo] = self.header.tensors
        self._args: dict[Optional[int], ModelArgs] = {}

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}")

    # -- metadata ---------------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` as stored (numbers, str, bool; arrays as numpy arrays or a
        ``StringArray``), or ``default``."""
        return self.header.metadata.get(key, default)

    def _value(self, key: str, default: Any) -> Any:
        value = self.header.metadata.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(f"missing metadata key '{key}'")
            return default
        return value

    def integer(self, key: str, default: Any = _REQUIRED, low: int = 1) -> Any:
        """Metadata ``key`` as an int of at least ``low`` (``default`` if absent; required without one)."""
        value = self._value(key, default)
        if value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(f"metadata key '{key}' must be an integer of at least {low}, got {_show(value)}")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._value(key, default)
        if value is default:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(f"metadata key '{key}' must be a number, got {_show(value)}")
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._value(key, default)
        if value is not default and not isinstance(value, str):
            raise self.fail(f"metadata key '{key}' must be a string, got {_show(value)}")
        return value

    def args(self, max_seq_len: Optional[int] = None) -> ModelArgs:
        """ModelArgs from the ``llama.*`` keys (read once); a missing or ill-typed key fails naming it. Sizes and
        counts are checked against the tensors the file holds before anything is built from them."""
        if max_seq_len not in self._args:
            self._args[max_seq_len] = self._read_args(max_seq_len)
        return self._args[max_seq_len]

    def _read_args(self, max_seq_len: Optional[int]) -> ModelArgs:
        arch = self.string("general.architecture")
        if arch != ARCH:
            raise self.fail(f"general.architecture is {arch!r}; sirocco reads Mistral and Mixtral files, which "
                            f"llama.cpp writes as {ARCH!r}")
        a = f"{arch}."
        dim = self.integer(a + "embedding_length")
        n_layers = self.integer(a + "block_count")
        if n_layers > len(self.tensors):
            raise self.fail(f"{a}block_count is {n_layers}, but the file holds only {len(self.tensors)} tensors")
        hidden = self.integer(a + "feed_forward_length")
        n_heads = self.integer(a + "attention.head_count")
        eps = f32(self.number(a + "attention.layer_norm_rms_epsilon"))
        n_kv = self.integer(a + "attention.head_count_kv", None)
        if n_kv is None:
            n_kv = n_heads
            log.info("%s: no %sattention.head_count_kv, using head_count = %d (as llama.cpp does)", self.path, a,
                     n_heads)
        head_dim = self.integer(a + "attention.key_length", None) or self.integer(a + "rope.dimension_count", None)
        if head_dim is None:
            head_dim = dim // n_heads
        theta = self.number(a + "rope.freq_base", None)
        if theta is None:
            theta = 10000.0
            log.info("%s: no %srope.freq_base, using llama.cpp's default 10000", self.path, a)
        scaling = self.string(a + "rope.scaling.type", None)
        if scaling not in (None, "none"):
            raise self.fail(f"{a}rope.scaling.type is {scaling!r}; sirocco has no RoPE scaling")
        window = self.integer(a + "attention.sliding_window", None, low=0) or None
        vocab = self.integer(a + "vocab_size", None)
        if vocab is None:
            tokens = self.get("tokenizer.ggml.tokens")
            if isinstance(tokens, StringArray) and len(tokens):
                vocab = len(tokens)
            elif "token_embd.weight" in self.tensors:
                vocab = self.tensors["token_embd.weight"].shape[0]
            else:
                raise self.fail(f"missing metadata key '{a}vocab_size' (and no token list)")
        self._check_sizes(a, dim=dim, hidden=hidden, query=n_heads * head_dim, key=n_kv * head_dim, vocab=vocab)
        experts = self.integer(a + "expert_count", 0, low=0)
        moe = None
        if experts:
            used = self.integer(a + "expert_used_count", None)
            if used is None:
                raise self.fail(f"missing metadata key '{a}expert_used_count' (the file has {a}expert_count = "
                                f"{experts})")
            moe = MoeArgs(num_experts=experts, num_experts_per_tok=used)
        if max_seq_len is None:
            max_seq_len = self.integer(a + "context_length", None) or 32768
        try:
            return ModelArgs(dim=dim, n_layers=n_layers, head_dim=head_dim, hidden_dim=hidden, n_heads=n_heads,
                             n_kv_heads=n_kv, norm_eps=eps, vocab_size=vocab, rope_theta=f32(theta),
                             sliding_window=window, max_seq_len=max_seq_len, moe=moe)
        except ConfigError as e:
            raise self.fail(f"the metadata describes no model sirocco can build: {e}") from None

    def _check_sizes(self, prefix: str, **sizes: int) -> None:
        """Every size of the model must be a dimension of one of its tensors, so none can exceed the largest
        dimension in the file: what the metadata claims never sizes anything (not even on the meta device) past
        what the file holds."""
        largest = max((max(t.shape) for t in self.tensors.values()), default=0)
        for what, size in sizes.items():
            if size > largest:
                raise self.fail(f"the metadata's {what} size {size} (from the {prefix}* keys) is larger than every "
                                f"dimension of the file's tensors (at most {largest})")

    # -- tensors ----------------------------------------------------------------------------------------------
    def index(self, args: ModelArgs) -> dict[str, Entry]:
        """Every tensor of the model by sirocco name, checked against ``args``: names, types and shapes, all
        before any data is read. Raises ModelFileError naming the tensors at fault."""
        self._check_expert_counts(args)
        try:
            expected = expected_shapes(args)
        except ConfigError as err:
            raise self.fail(str(err)) from None
        entries: dict[str, Entry] = {}
        unexpected: list[str] = []
        for name, info in self.tensors.items():
            known = from_gguf_name(name)
            if known is None or (known[0].startswith("layers.") and ".experts." in known[0] and args.moe is None):
                unexpected.append(name)
                continue
            template, stacked = known
            if stacked:
                assert args.moe is not None
                for e in range(args.moe.num_experts):
                    entries[template.format(e=e)] = Entry(info, e)
            else:
                entries[template] = Entry(info)
        unexpected += [e.describe() for n, e in entries.items() if n not in expected]
        missing = [n for n in expected if n not in entries]
        wrong = [f"{e.describe()} has shape {list(e.shape)}, the metadata needs {list(expected[n])}"
                 for n, e in entries.items() if n in expected and e.shape != expected[n]]
        odd = [f"{e.describe()} ({e.info.type})" for n, e in entries.items()
               if n in expected and len(expected[n]) == 1 and e.info.quantized]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:6])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(sorted(set(unexpected))[:6])}")
        if wrong:
            problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {'; '.join(wrong[:6])}")
        if odd:
            problems.append(f"quantized vectors sirocco cannot use: {', '.join(odd[:6])}")
        if problems:
            raise ModelFileError(f"{self.path} does not match its metadata: " + "; ".join(problems))
        return {n: entries[n] for n in expected}

    def _check_expert_counts(self, args: ModelArgs) -> None:
        """The expert count against the file before a name is made per expert: each stacked experts tensor must
        be (E, rows, K) with E the count, and a file of one tensor per expert must hold that many tensors."""
        if args.moe is None:
            return
        count = args.moe.num_experts
        stacks = [(n, t) for n, t in self.tensors.items() if n.endswith("_exps.weight")]
        for name, t in stacks:
            if len(t.shape) != 3 or t.shape[0] != count:
                raise self.fail(f"{name} has shape {list(t.shape)}; the metadata's {count} experts need "
                                f"[{count}, rows, columns]")
        if not stacks and count > len(self.tensors):
            raise self.fail(f"the metadata claims {count} experts, more than the file's {len(self.tensors)} "
                            "tensors")

    def read(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
             head: bool = True, progress: Optional[bool] = None) -> GGUFWeights:
        """The weights of the model (or of the stage ``layers``, ``embed``, ``head``; the other tensors are not
        read): see the module docstring."""
        args = self.args(max_seq_len)
        entries = self.index(args)
        wanted = stage_names(list(entries), layers, embed, head)
        on_cpu = torch.device(device).type == "cpu"
        quantized = {n for n in wanted if keeps_blocks(n, entries[n])}
        # by GGUF name, each tensor read or converted once (a stack of experts once for all its experts)
        stacks = self._read_blocks([entries[n].info for n in wanted if n in quantized]) if on_cpu else {}
        out = GGUFWeights(args, {}, {})
        converted: dict[str, torch.Tensor] = {}
        for name in tqdm(wanted, desc=f"loading {self.path.name}", unit="tensor", leave=False,
                         disable=None if progress is None else not progress):
            entry = entries[name]
            info = entry.info
            out.types[info.type] = out.types.get(info.type, 0) + 1
            if name in quantized:
                fmt = QUANT_FORMATS[info.type]
                if info.name not in stacks:
                    stacks[info.name] = self._mapped(info).to(device)
                data = stacks[info.name]
                out.blocks[name.removesuffix(".weight")] = QuantizedTensor(
                    data if entry.expert is None else data[entry.expert], fmt, entry.shape)
                continue
            if info.quantized:
                out.dequantized.append(f"{entry.describe()} ({info.type})")
                if name == "tok_embeddings.weight":
                    out.embedding_type = QUANT_FORMATS[info.type]
                raw = self._mapped(info)
                qt = QuantizedTensor(raw if entry.expert is None else raw[entry.expert], QUANT_FORMATS[info.type],
                                     entry.shape)
                out.state[name] = dequantize_rows(qt, dtype, device)
                continue
            if info.name not in converted:
                t = self._mapped(info)
                # used as stored, a tensor stays memory-mapped; converted, it is a private copy
                converted[info.name] = t if t.dtype == dtype and on_cpu else t.to(device=device, dtype=dtype)
            t = converted[info.name]
            out.state[name] = t if entry.expert is None else t[entry.expert]
        if out.dequantized:
            log.info("%s: dequantized to %s (kept in float by sirocco): %s", self.path.name,
                     str(dtype).replace("torch.", ""), ", ".join(out.dequantized))
        log.info("read %s (GGUF, %d tensors: %s)", self.path, len(wanted),
                 ", ".join(f"{n} {k}" for k, n in sorted(out.types.items())))
        return out

    def _mapped(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes in the file's mapping, as torch: a float tensor of its shape, or uint8 blocks
        (..., row bytes)."""
        raw = torch.from_numpy(self.header.data[info.offset:info.offset + info.nbytes])
        if info.quantized:
            return raw.view(*info.shape[:-1], -1)
        return raw.view(FLOAT_DTYPES[info.type]).view(info.shape)

    def _read_blocks(self, infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
        """The quantized blocks of these GGUF tensors (a MoE layer's stacked experts once), read from the file
        into huge-page memory by plain reads, so that no page of the file stays mapped: by GGUF name."""
        unique = list({t.name: t for t in infos}.values())
        buffers = huge_page_tensors([tuple(self._mapped(t).shape) for t in unique])
        try:
            with open(self.path, "rb", buffering=0) as f:
                for t, buf in zip(unique, buffers):
                    f.seek(t.offset)
                    view, done = buf.numpy().data.cast("B"), 0
                    while done < len(view):
                        n = f.readinto(view[done:])
                        if not n:
                            raise self.fail(f"the file ends inside tensor {t.name} (changed while read?)")
                        done += n
        except OSError as e:
            raise self.fail(f"cannot read the tensors: {e.strerror or e}") from None
        return {t.name: buf for t, buf in zip(unique, buffers)}

    # -- tokenizer --------------------------------------------------------------------------------------------
    def tokenizer(self, vocab_size: Optional[int] = None) -> Tokenizer:
        """The sentencepiece tokenizer of the file's vocabulary, its fields checked first (types, one score and
        type per token, special ids among the tokens, no more tokens than ``vocab_size``: the model's embedding
        rows, default the metadata's)."""
        tokens = self.get("tokenizer.ggml.tokens")
        if tokens is not None:
            if not isinstance(tokens, StringArray):
                raise self.fail(f"metadata key 'tokenizer.ggml.tokens' must be an array of strings, got "
                                f"{_show(tokens)}")
            limit = vocab_size if vocab_size is not None else self.args().vocab_size
            if len(tokens) > limit:
                raise self.fail(f"the vocabulary has {len(tokens)} tokens, more than the model's {limit} embedding "
                                "rows")
            for key, kinds in (("scores", "fi"), ("token_type", "iu")):
                value = self.get(f"tokenizer.ggml.{key}")
                if value is not None and not (isinstance(value, np.ndarray) and value.dtype.kind in kinds):
                    raise self.fail(f"metadata key 'tokenizer.ggml.{key}' must be an array of numbers, got "
                                    f"{_show(value)}")
            types = self.get("tokenizer.ggml.token_type")
            if isinstance(types, np.ndarray) and len(types) and (types.min() < 1 or types.max() > 6):
                raise self.fail("metadata key 'tokenizer.ggml.token_type' holds a value outside sentencepiece's "
                                "token types 1..6")
            for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
                value = self.integer(f"tokenizer.ggml.{key}", None, low=0 if key != "padding_token_id" else -1)
                if value is not None and value >= len(tokens) and key != "padding_token_id":
                    raise self.fail(f"tokenizer.ggml.{key} is {value}, past the {len(tokens)} tokens")
        self.string("tokenizer.ggml.model", None)
        for key in ("add_bos_token", "add_eos_token", "add_space_prefix", "remove_extra_whitespaces"):
            value = self.get(f"tokenizer.ggml.{key}")
            if value is not None and not isinstance(value, (bool, int)):
                raise self.fail(f"metadata key 'tokenizer.ggml.{key}' must be a flag, got {_show(value)}")
        try:
            return tokenizer_from_fields(self.get, self.path)
        except TokenizerError as e:
            raise ModelFileError(str(e)) from None


def keeps_blocks(name: str, entry: Entry) -> bool:
    """Whether the tensor ``name`` is loaded as the file's blocks (a quantized linear weight) rather than in
    float."""
    return entry.info.quantized and len(entry.shape) == 2 and not name.endswith(FLOAT_ONLY)


def _show(value: Any) -> str:
    if isinstance(value, (StringArray, np.ndarray)):
        return f"an array of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
