"""GGUF, the third checkpoint format: one file with the config, the tokenizer and the tensors (llama.cpp's format).

Reading (``load_gguf``; its tokenizer: ``tokenizer.gguf_vocab.gguf_tokenizer``): a Mistral or Mixtral file as
llama.cpp writes it (architecture "llama"), tensors of type F32, F16, BF16, Q8_0 or Q4_0. Quantized linear weights
stay as the file's blocks, byte for byte with no re-quantization (``QuantLinear``; on CPU the blocks are read
once into huge-page memory, where decode reads them faster than from the file's mapping, and elsewhere copied to
the device); float tensors are converted to the dtype asked (or stay memory-mapped where used as stored); a
quantized embedding or router is dequantized (sirocco keeps those in float). Mixtral's stacked experts
(``blk.i.ffn_gate_exps`` of shape (E, N, K)) become sirocco's per-expert weights as views of the stacked tensor.
Every tensor's name, type and shape is checked before anything is read.

Writing (``save_gguf``): the tensors a model holds, quantized blocks byte for byte, in llama.cpp's names and
metadata keys, with the tokenizer of a sentencepiece ``tokenizer.model``.

Row layout of wq/wk: llama.cpp's converter permutes Hugging Face's rows back to the interleaved pairs of Mistral's
consolidated weights, which is sirocco's internal layout: no permutation here (checked against the converter's
output, see the tests and docs).

Names (sirocco <-> GGUF): tok_embeddings <-> token_embd, norm <-> output_norm, output <-> output;
layers.i.attention_norm / ffn_norm <-> blk.i.attn_norm / ffn_norm; attention.wq/wk/wv/wo <-> attn_q/k/v/output;
feed_forward.w1/w2/w3 <-> ffn_gate/down/up; feed_forward.gate <-> ffn_gate_inp; experts.e.w1/w2/w3 <-> row e of
ffn_gate_exps/ffn_down_exps/ffn_up_exps (or the older per-expert blk.i.ffn_gate.e etc.).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelArgs, MoeArgs
from ..errors import CheckpointError, ConfigError
from ..model import Transformer

log = logging.getLogger(__name__)

ARCH = "llama"
SUFFIX = ".gguf"
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_QUANT = {"Q8_0": "q8_0", "Q4_0": "q4_0"}

# (sirocco name, GGUF name); {i} a layer
NAMES = [
    ("tok_embeddings.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("output.weight", "output.weight"),
    ("layers.{i}.attention_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.attention.wq.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.feed_forward.w1.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.feed_forward.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
]
EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}       # + "_exps" stacked, or ".{e}" per expert


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips in float32 (1e-5 stays 1e-05, not
    9.999999747378752e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def is_gguf(path: str | Path) -> bool:
    """A ``.gguf`` file (by name; the reader checks the magic)."""
    p = Path(path)
    return p.suffix.lower() == SUFFIX and p.is_file()


# -- reading ----------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    """Where one sirocco tensor is in the file: a GGUF tensor, or row ``expert`` of a stacked one."""
    tensor: Any                  # gguf.ReaderTensor
    expert: Optional[int] = None

    @property
    def type_name(self) -> str:
        return self.tensor.tensor_type.name

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(int(d) for d in reversed(self.tensor.shape.tolist()))   # GGUF lists innermost first
        return shape[1:] if self.expert is not None else shape


class GGUFFile:
    """A GGUF file opened once: its metadata, model config, tokenizer and tensors (memory-mapped,
    copy-on-write so that tensors can be handed to torch without a copy)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader
        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path), "c")
        except Exception as e:      # ValueError for a bad magic/version, OSError, numpy errors on a truncated file
            raise CheckpointError(f"{self.path}: cannot read GGUF file ({type(e).__name__}: {e}); is it truncated "
                                  "or not a GGUF file?") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    # metadata
    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: missing metadata key '{key}'")
        return value

    def args(self, max_seq_len: Optional[int] = None) -> ModelArgs:
        """ModelArgs from the ``llama.*`` keys; a missing required key fails naming it."""
        arch = self.require("general.architecture")
        if arch != ARCH:
            raise CheckpointError(f"{self.path}: general.architecture is {arch!r}; sirocco reads Mistral and Mixtral "
                                  f"files, which llama.cpp writes as {ARCH!r}")
        a = f"{arch}."
        dim = int(self.require(a + "embedding_length"))
        n_layers = int(self.require(a + "block_count"))
        hidden = int(self.require(a + "feed_forward_length"))
        n_heads = int(self.require(a + "attention.head_count"))
        eps = _f32(self.require(a + "attention.layer_norm_rms_epsilon"))
        n_kv = self.get(a + "attention.head_count_kv")
        if n_kv is None:
            n_kv = n_heads
            log.info("%s: no %sattention.head_count_kv, using head_count = %d (as llama.cpp does)", self.path, a,
                     n_heads)
        head_dim = self.get(a + "attention.key_length") or self.get(a + "rope.dimension_count")
        if head_dim is None:
            head_dim = dim // n_heads
        theta = self.get(a + "rope.freq_base")
        if theta is None:
            theta = 10000.0
            log.info("%s: no %srope.freq_base, using llama.cpp's default 10000", self.path, a)
        scaling = self.get(a + "rope.scaling.type")
        if scaling not in (None, "none"):
            raise CheckpointError(f"{self.path}: {a}rope.scaling.type is {scaling!r}; sirocco has no RoPE scaling")
        window = self.get(a + "attention.sliding_window")
        if isinstance(window, int) and window <= 0:
            window = None
        vocab = self.get(a + "vocab_size")
        if vocab is None:
            tokens = self.reader.get_field("tokenizer.ggml.tokens")
            if tokens is not None:
                vocab = len(tokens.data)
            elif "token_embd.weight" in self.tensors:
                vocab = int(self.tensors["token_embd.weight"].shape[1])
            else:
                raise CheckpointError(f"{self.path}: missing metadata key '{a}vocab_size' (and no token list)")
        experts = self.get(a + "expert_count")
        moe = None
        if experts:
            used = self.get(a + "expert_used_count")
            if used is None:
                raise CheckpointError(f"{self.path}: missing metadata key '{a}expert_used_count' (the file has "
                                      f"{a}expert_count = {experts})")
            moe = MoeArgs(num_experts=int(experts), num_experts_per_tok=int(used))
        if max_seq_len is None:
            max_seq_len = int(self.get(a + "context_length") or 32768)
        try:
            return ModelArgs(dim=dim, n_layers=n_layers, head_dim=int(head_dim), hidden_dim=hidden, n_heads=n_heads,
                             n_kv_heads=int(n_kv), norm_eps=eps, vocab_size=int(vocab), rope_theta=_f32(theta),
                             sliding_window=None if window is None else int(window), max_seq_len=max_seq_len,
                             moe=moe)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    # tensors
    def index(self, args: ModelArgs) -> dict[str, _Entry]:
        """Every tensor of the file by sirocco name, checked against ``args``: names, types and shapes, all before
        any data is read. Raises CheckpointError naming the tensors at fault."""
        table = [(re.compile(re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)")), s) for s, g in NAMES]
        stacked = re.compile(r"blk\.(?P<i>\d+)\.(?P<w>ffn_gate|ffn_down|ffn_up)_exps\.weight")
        single = re.compile(r"blk\.(?P<i>\d+)\.(?P<w>ffn_gate|ffn_down|ffn_up)\.(?P<e>\d+)\.weight")
        w_of = {v: k for k, v in EXPERTS.items()}
        bad_types = [f"{name} ({t.tensor_type.name})" for name, t in self.tensors.items()
                     if t.tensor_type.name not in READ_TYPES]
        if bad_types:
            raise CheckpointError(f"{self.path}: tensor type not supported: {', '.join(bad_types[:6])}"
                                  f"{' ...' if len(bad_types) > 6 else ''}; sirocco reads {', '.join(READ_TYPES)}")
        with torch.device("meta"):
            expected = {n: tuple(t.shape) for n, t in Transformer(args).state_dict().items()}
        entries: dict[str, _Entry] = {}
        unexpected: list[str] = []
        for name, t in self.tensors.items():
            m = stacked.fullmatch(name)
            if m and args.moe is not None:
                n_exp = int(t.shape[-1]) if len(t.shape) == 3 else -1
                if n_exp != args.moe.num_experts:
                    unexpected.append(f"{name} (shape {list(reversed(t.shape.tolist()))}, expected "
                                      f"{args.moe.num_experts} experts)")
                    continue
                for e in range(n_exp):
                    entries[f"layers.{m['i']}.feed_forward.experts.{e}.{w_of[m['w']]}.weight"] = _Entry(t, e)
                continue
            m = single.fullmatch(name)
            if m and args.moe is not None:
                entries[f"layers.{m['i']}.feed_forward.experts.{m['e']}.{w_of[m['w']]}.weight"] = _Entry(t)
                continue
            for pattern, template in table:
                m = pattern.fullmatch(name)
                if m:
                    entries[template.format(**m.groupdict())] = _Entry(t)
                    break
            else:
                unexpected.append(name)
        unexpected += [f"{e.tensor.name}" for n, e in entries.items() if n not in expected]
        missing = [n for n in expected if n not in entries]
        wrong = [f"{e.tensor.name}{'' if e.expert is None else f'[{e.expert}]'} has shape {list(e.shape)}, the "
                 f"metadata needs {list(expected[n])}" for n, e in entries.items()
                 if n in expected and e.shape != expected[n]]
        odd = [f"{e.tensor.name} ({e.type_name})" for n, e in entries.items()
               if n in expected and len(expected[n]) == 1 and e.type_name in _QUANT]
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
            raise CheckpointError(f"{self.path} does not match its metadata: " + "; ".join(problems))
        return {n: entries[n] for n in expected}

    def raw(self, entry: _Entry):
        """The tensor's data as torch, memory-mapped: a float tensor of its logical shape, or a QuantizedTensor."""
        from ..backends.quant.formats import QuantizedTensor
        t = entry.tensor
        data = torch.from_numpy(t.data)
        if entry.expert is not None:
            data = data[entry.expert]
        kind = entry.type_name
        if kind in _QUANT:
            return QuantizedTensor(data, _QUANT[kind], entry.shape)
        if kind == "BF16":
            data = data.view(torch.bfloat16)
        return data.reshape(entry.shape)

    def _read_blocks(self, entries: list[_Entry]) -> dict[int, torch.Tensor]:
        """The quantized blocks of these entries' GGUF tensors (a MoE layer's stacked experts once), read from the
        file into huge-page memory (backends/quant/hugepages.py, where decode reads them faster than from the
        file's 4 KiB pages) by plain reads, so that no page of the file stays mapped: keyed by id(ReaderTensor)."""
        from ..backends.quant.hugepages import huge_page_tensors
        tensors = list({id(e.tensor): e.tensor for e in entries}.values())
        out = huge_page_tensors([tuple(t.data.shape) for t in tensors])
        with open(self.path, "rb", buffering=0) as f:
            for t, buf in zip(tensors, out):
                f.seek(int(t.data_offset))
                view, done = buf.numpy().data.cast("B"), 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(f"{self.path}: the file ends inside tensor {t.name}")
                    done += n
        return {id(t): buf for t, buf in zip(tensors, out)}

    def model(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
              head: bool = True, progress: Optional[bool] = None) -> Transformer:
        from ..backends.quant.formats import QuantizedTensor
        from ..backends.quant.linear import QuantLinear
        args = self.args(max_seq_len)
        entries = self.index(args)
        with torch.device("meta"):
            model = Transformer(args, layers=layers, embed=embed, head=head)
        wanted = list(model.state_dict())
        on_cpu = torch.device(device).type == "cpu"

        def becomes_quant_linear(name: str) -> bool:
            path = name.rpartition(".")[0]
            return (entries[name].type_name in _QUANT and type(model.get_submodule(path)) is nn.Linear
                    and not path.endswith("feed_forward.gate"))
        blocks = self._read_blocks([entries[n] for n in wanted if becomes_quant_linear(n)]) if on_cpu else {}
        state: dict[str, torch.Tensor] = {}
        dequantized: list[str] = []
        types: dict[str, int] = {}
        for name in tqdm(wanted, desc=f"loading {self.path.name}", unit="tensor", leave=False,
                         disable=None if progress is None else not progress):
            entry = entries[name]
            types[entry.type_name] = types.get(entry.type_name, 0) + 1
            t = self.raw(entry)
            path = name.rpartition(".")[0]
            module = model.get_submodule(path)
            if isinstance(t, QuantizedTensor):
                if becomes_quant_linear(name):
                    assert isinstance(module, nn.Linear)
                    parent, _, child = path.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child,
                            QuantLinear(module.in_features, module.out_features, t.fmt,
                                                device=torch.device("meta")))
                    if on_cpu:
                        stacked = blocks[id(entry.tensor)]
                        state[path + ".qweight"] = stacked if entry.expert is None else stacked[entry.expert]
                    else:
                        state[path + ".qweight"] = t.data.to(device)
                    continue
                dequantized.append(f"{entry.tensor.name} ({entry.type_name})")
                t = t.dequantize()
            if t.dtype == dtype and on_cpu:
                state[name] = t                     # used as stored: stays memory-mapped
            else:
                state[name] = t.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
        from ..backends.quant.convert import attach_kernels
        attach_kernels(model)       # the experts' blocks are views of ffn_*_exps: stacked as they are
        if dequantized:
            log.info("%s: dequantized to %s (kept in float by sirocco): %s", self.path.name,
                     str(dtype).replace("torch.", ""), ", ".join(dequantized))
        log.info("loaded %s (GGUF, %d tensors: %s) as %s on %s", self.path,
                 len(state), ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
                 str(dtype).replace("torch.", ""), device)
        return model

    def tokenizer(self):
        from ..tokenizer.gguf_vocab import tokenizer_from_fields
        return tokenizer_from_fields(self.get, self.path)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              max_seq_len: Optional[int] = None, layers: Optional[list[int]] = None, embed: bool = True,
              head: bool = True, progress: Optional[bool] = None) -> Transformer:
    """The model of a GGUF file (see the module docstring); arguments as ``checkpoint.load_model``."""
    return GGUFFile(path).model(dtype, device, max_seq_len, layers, embed, head, progress)


# -- writing ----------------------------------------------------------------------------------------------------

def _gguf_name(name: str) -> str:
    for s, g in NAMES:
        m = re.fullmatch(re.escape(s).replace(r"\{i\}", r"(?P<i>\d+)"), name)
        if m:
            return g.format(**m.groupdict())
    raise KeyError(name)


def _float_array(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as Q
    t = t.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.uint8).numpy(), Q.BF16
    return t.numpy(), Q.F32 if dtype == torch.float32 else Q.F16


def save_gguf(model: Transformer, path: str | Path, tokenizer_model: str | Path, float_dtype: torch.dtype =
              torch.float16, name: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    """Write ``model`` as a GGUF file llama.cpp loads: metadata, the vocabulary of the sentencepiece
    ``tokenizer_model``, and the tensors the model holds. ``QuantLinear`` blocks are written byte for byte as
    Q8_0/Q4_0; norms and the MoE router as F32 (as llama.cpp's converter and quantize leave them); other float
    tensors (the embedding, and linear layers kept in float) in ``float_dtype``. Returns a summary: tensors by
    type, bytes."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ..backends.quant.linear import QuantLinear
    from ..tokenizer.gguf_vocab import vocab_from_sentencepiece

    if model.tok_embeddings is None or model.output is None or len(model.layers) != model.args.n_layers:
        raise CheckpointError("save_gguf writes whole models, not pipeline stages")
    args = model.args
    if isinstance(args.sliding_window, list):
        raise CheckpointError("sliding_window: a per-layer list of windows has no GGUF 'llama' equivalent")
    vocab = vocab_from_sentencepiece(str(tokenizer_model), args.vocab_size)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name or path.stem)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_key_length(args.head_dim)             # llama.cpp's converter writes both always
    w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window is not None:
        w.add_sliding_window(args.sliding_window)
    if args.moe is not None:
        w.add_expert_count(args.moe.num_experts)
        w.add_expert_used_count(args.moe.num_experts_per_tok)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")              # what llama.cpp's converter writes for sentencepiece vocabularies
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)

    counts: dict[str, int] = {}
    total = 0

    def add(gname: str, array: np.ndarray, qtype: Any) -> None:
        nonlocal total
        w.add_tensor(gname, array, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        total += array.nbytes

    def linear(module: nn.Module) -> tuple[np.ndarray, Any]:
        if isinstance(module, QuantLinear):
            return module.qweight.detach().cpu().contiguous().numpy(), Q[module.fmt.upper()]
        assert isinstance(module, nn.Linear), f"not a linear layer: {type(module).__name__}"
        return _float_array(module.weight, float_dtype)

    assert model.tok_embeddings is not None and model.norm is not None and model.output is not None, \
        "a whole model (not a pipeline stage)"
    add("token_embd.weight", *_float_array(model.tok_embeddings.weight, float_dtype))
    for i, layer in tqdm(list(model.layers.items()), desc="writing layers", unit="layer", leave=False,
                         disable=None if progress is None else not progress):
        p = f"layers.{i}."
        add(_gguf_name(p + "attention_norm.weight"), *_float_array(layer.attention_norm.weight, torch.float32))
        for wn in ("wq", "wk", "wv", "wo"):
            add(_gguf_name(f"{p}attention.{wn}.weight"), *linear(getattr(layer.attention, wn)))
        add(_gguf_name(p + "ffn_norm.weight"), *_float_array(layer.ffn_norm.weight, torch.float32))
        ff = layer.feed_forward
        if args.moe is None:
            for wn in ("w1", "w2", "w3"):
                add(_gguf_name(f"{p}feed_forward.{wn}.weight"), *linear(getattr(ff, wn)))
        else:
            add(f"blk.{i}.ffn_gate_inp.weight", *_float_array(ff.gate.weight, torch.float32))
            for wn, gname in EXPERTS.items():
                parts = [linear(getattr(expert, wn)) for expert in ff.experts]
                kinds = {k for _, k in parts}
                if len(kinds) != 1:
                    raise CheckpointError(f"layer {i}: experts' {wn} are stored in different types {kinds}")
                add(f"blk.{i}.{gname}_exps.weight", np.stack([a for a, _ in parts]), kinds.pop())
    add("output_norm.weight", *_float_array(model.norm.weight, torch.float32))
    add("output.weight", *linear(model.output))
    quant = {k for k in counts if k in _QUANT}
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    wq = model.layers[next(iter(model.layers))].attention.wq  # type: ignore[union-attr]
    if isinstance(wq, QuantLinear):
        w.add_file_type(ftype[wq.fmt.upper()])
    else:
        w.add_file_type({torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                         torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[float_dtype])
    if quant:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=bool(progress))
    w.close()
    size = path.stat().st_size
    log.info("wrote %s (GGUF, %d tensors: %s; %.1f MiB)", path, sum(counts.values()),
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), size / 2**20)
    return {"tensors": counts, "tensor_bytes": total, "file_bytes": size}
