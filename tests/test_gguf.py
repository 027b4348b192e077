"""GGUF read and write (checkpoint/gguf_read.py, gguf_write.py) and the tokenizer a GGUF file carries
(tokenizer/gguf_vocab.py).

The files are written by sirocco's own writer (no llama.cpp at test time); that writer's output was compared
tensor by tensor with llama.cpp's convert_hf_to_gguf.py on the same Hugging Face checkpoint (see the docs)."""

import random
from pathlib import Path

import gguf
import mistral_common
import pytest
import sentencepiece
import torch

from sirocco import backends
from sirocco.backends.quant.hugepages import HUGE_PAGE
from sirocco.backends.quant.linear import QuantLinear
from sirocco.checkpoint import GGUFFile, load_model
from sirocco.checkpoint.gguf_read import expected_shapes
from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.config import preset
from sirocco.errors import CheckpointError
from sirocco.model import Transformer
from sirocco.pretrained import BUNDLED, load
from sirocco.tokenizer import load_tokenizer
from sirocco.tokenizer.gguf_vocab import sentencepiece_proto, vocab_from_sentencepiece

from hf_fixtures import hf_logits, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SP = BUNDLED / "sirocco-tiny" / "tokenizer.model"
V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def hf_folder(tmp_path, kind):
    folder = tmp_path / f"hf-{kind}"
    hf = hf_model(kind, window=6, vocab_size=4096)
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(TINY_SP.read_bytes())
    return folder, hf


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_f32_gguf_of_a_hf_checkpoint_gives_transformers_logits(tmp_path, kind):
    folder, hf = hf_folder(tmp_path, kind)
    model = load_model(folder)
    save_gguf(model, tmp_path / "m.gguf", folder / "tokenizer.model", float_dtype=torch.float32)
    g = GGUFFile(tmp_path / "m.gguf")
    args = g.args()
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.sliding_window,
            args.rope_theta, args.norm_eps) == (64, 2, 4, 2, 16, 6, hf.config.rope_parameters["rope_theta"], 1e-5)
    assert (args.moe is None) == (kind == "mistral")
    loaded = load_model(g)
    tokens = torch.randint(0, 4096, (20,))          # longer than the window
    with torch.no_grad():
        got = loaded(tokens, [20])
    torch.testing.assert_close(got, hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("float_dtype", [torch.float16, torch.bfloat16])
def test_f16_and_bf16_tensors_convert_to_the_dtype_asked(tmp_path, float_dtype):
    model = load_model(BUNDLED / "sirocco-tiny")
    save_gguf(model, tmp_path / "m.gguf", TINY_SP, float_dtype=float_dtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == {torch.float16: "F16", torch.bfloat16: "BF16"}[float_dtype]
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    back = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        want = t if name.endswith("norm.weight") else t.to(float_dtype)
        assert torch.equal(back.state_dict()[name], want.to(torch.bfloat16)), name


def test_mixtral_experts_are_views_of_the_stacked_blocks(tmp_path):
    model = load_model(BUNDLED / "sirocco-tiny-moe")
    backends.attach(model, "torch", quantize="q4_0")
    save_gguf(model, tmp_path / "m.gguf", BUNDLED / "sirocco-tiny-moe" / "tokenizer.model")
    g = GGUFFile(tmp_path / "m.gguf")
    stacked = g.tensors["blk.1.ffn_down_exps.weight"]
    assert stacked.type == "Q4_0" and list(stacked.shape) == [4, model.args.dim, model.args.hidden_dim]
    back = load_model(g)
    experts = back.layers["1"].feed_forward.experts
    # read once into huge-page memory, out of the file's mapping, and every expert a row of that one buffer
    file = torch.from_numpy(g.header.data)
    base = experts[0].w2.qweight.data_ptr()
    assert not file.data_ptr() <= base < file.data_ptr() + file.numel()
    row = stacked.nbytes // stacked.shape[0]
    for e, expert in enumerate(experts):
        assert isinstance(expert.w2, QuantLinear) and expert.w2.fmt == "q4_0"
        assert expert.w2.qweight.data_ptr() == base + e * row          # rows of one buffer: qmoe reads in place
        assert torch.equal(expert.w2.qweight, model.layers["1"].feed_forward.experts[e].w2.qweight)
    blocks = [m.qweight for m in back.modules() if isinstance(m, QuantLinear)]
    assert min(q.data_ptr() for q in blocks) % HUGE_PAGE == 0
    assert type(back.layers["1"].feed_forward.gate) is torch.nn.Linear       # router stays float


# types llama.cpp writes that sirocco does not run
UNSUPPORTED = ["IQ2_XXS", "IQ2_S", "IQ1_S", "IQ3_S", "TQ1_0", "TQ2_0", "Q8_1", "Q8_K"]


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_unsupported_tensor_type_fails_before_any_data_naming_tensor_type_and_list(tmp_path, monkeypatch, kind):
    """A file holding a type sirocco does not run (raw bytes written under that type's header) is refused as
    its header is read, naming the tensor, its type and the types sirocco reads: no tensor data is read."""
    model = load_model(BUNDLED / "sirocco-tiny")
    add = gguf.GGUFWriter.add_tensor
    qtype = gguf.GGMLQuantizationType[kind]

    def odd_type_for_wk(self, name, array, raw_shape=None, raw_dtype=None, **kw):
        if name == "blk.1.attn_k.weight":           # 32 rows of one block of the type
            array, raw_dtype = torch.zeros(32, gguf.GGML_QUANT_SIZES[qtype][1], dtype=torch.uint8).numpy(), qtype
        return add(self, name, array, raw_shape, raw_dtype, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", odd_type_for_wk)
    save_gguf(model, tmp_path / "m.gguf", TINY_SP)
    monkeypatch.undo()
    read = []
    monkeypatch.setattr(GGUFFile, "_mapped", lambda self, info: read.append(info.name))
    monkeypatch.setattr(GGUFFile, "_read_blocks", lambda self, infos: read.extend(infos))
    with pytest.raises(CheckpointError, match=rf"tensor type not supported: blk\.1\.attn_k\.weight \({kind}\); "
                                              r"sirocco reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, "
                                              r"Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS$"):
        load_model(tmp_path / "m.gguf")
    assert read == []


@pytest.mark.parametrize("method,key", [("add_layer_norm_rms_eps", "llama.attention.layer_norm_rms_epsilon"),
                                        ("add_block_count", "llama.block_count"),
                                        ("add_token_list", "tokenizer.ggml.tokens")])
def test_missing_metadata_fails_naming_the_key(tmp_path, monkeypatch, method, key):
    model = load_model(BUNDLED / "sirocco-tiny")
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, *a: None)
    save_gguf(model, tmp_path / "m.gguf", TINY_SP)
    monkeypatch.undo()
    with pytest.raises(Exception, match=f"missing metadata key '{key}'"):
        load(str(tmp_path / "m.gguf"))


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    model = load_model(BUNDLED / "sirocco-tiny")
    model.args = model.args.replace(hidden_dim=model.args.hidden_dim * 2)     # metadata lies about the shape
    save_gguf(model, tmp_path / "m.gguf", TINY_SP)
    h, d = model.args.hidden_dim, model.args.dim
    with pytest.raises(CheckpointError, match=rf"blk\.0\.ffn_gate\.weight has shape \[{h // 2}, {d}\], the metadata "
                                              rf"needs \[{h}, {d}\]"):
        load_model(tmp_path / "m.gguf")


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_the_shapes_a_file_is_checked_against_are_the_models(name):
    args = preset(name, n_layers=3)
    with torch.device("meta"):
        want = [(n, tuple(t.shape)) for n, t in Transformer(args).state_dict().items()]
    assert list(expected_shapes(args).items()) == want


def texts(n=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "sliding", "window", "Mistral", "café", "naïve", "東京", "Привет", "🙂", "x²", "1234567",
             "3.14159", "<s>", "</s>", "[INST]", "[/INST]", "\t", "\n", "  ", "   ", "a\u00a0b", "ÆØÅ", "œuvre", "𝔘𝔫𝔦",
             "def f(x):", "    return", "--", "!!", "'quoted'", "ç", "ü", "0", "42", "\u200b", "�"]
    out = ["", " ", "  leading", "trailing  ", "a  b   c", "\n\n", "12 345 6789", "<unk>"]
    while len(out) < n:
        k = rng.randint(1, 8)
        sep = rng.choice([" ", "", "  ", "\n", " \t"])
        out.append(sep.join(rng.choice(words) for _ in range(k)))
    return out


@pytest.mark.parametrize("sp_file", [TINY_SP, V1], ids=["sirocco-tiny", "mistral-v1"])
def test_rebuilt_sentencepiece_encodes_and_decodes_like_the_original(sp_file):
    original = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    proto = sentencepiece_proto(vocab_from_sentencepiece(str(sp_file)))
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert rebuilt.get_piece_size() == original.get_piece_size()
    for s in texts():
        ids = original.encode(s)
        assert rebuilt.encode(s) == ids, s
        assert rebuilt.decode(ids) == original.decode(ids), s
    control = [i for i in range(original.get_piece_size()) if original.IsControl(i)]
    assert rebuilt.decode(control + [5, 100]) == original.decode(control + [5, 100])
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id()) == (original.bos_id(), original.eos_id(),
                                                                     original.unk_id())


def test_tokenizer_of_a_gguf_file_is_the_one_it_was_written_with(tmp_path):
    model = load_model(BUNDLED / "sirocco-tiny")
    save_gguf(model, tmp_path / "m.gguf", TINY_SP)
    original, from_file = load_tokenizer(TINY_SP), GGUFFile(tmp_path / "m.gguf").tokenizer()
    assert (from_file.bos_id, from_file.eos_id, from_file.vocab_size) == (1, 2, 4096)
    for s in texts(200, seed=1):
        ids = original.encode(s, bos=True, eos=True)
        assert from_file.encode(s, bos=True, eos=True) == ids, s
        assert from_file.decode(ids) == original.decode(ids) and from_file.decode(ids[3:]) == original.decode(ids[3:])


def test_a_missing_protobuf_is_named_not_a_traceback(monkeypatch):
    import sys

    from sirocco.errors import TokenizerError
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)     # import fails as without it
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    with pytest.raises(TokenizerError, match=r"sentencepiece's model proto, which did not load \(ModuleNotFoundError.*"
                                             r"pip install -U protobuf"):
        vocab_from_sentencepiece(str(TINY_SP))
