"""The token embedding of a GGUF file kept as its blocks (backends/quant/embedding.py's ``QuantEmbedding``): its rows
are the rows of the table dequantized whole, bit for bit; a model loaded from a file with a quantized embedding
holds no float table, has the state dict and generates the tokens of the same model with the float table."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sirocco.backends.quant.convert import ROUNDED_THROUGH, dequantize_rows
from sirocco.backends.quant.embedding import QuantEmbedding
from sirocco.backends.quant.formats import QuantizedTensor
from sirocco.backends.quant.layouts import random_blocks
from sirocco.checkpoint import GGUFFile, load_model
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_gguf.py"


def make_gguf():
    spec = importlib.util.spec_from_file_location("make_gguf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_gguf"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_1", "q2_K", "q3_K", "q4_K", "q6_K", "iq4_xs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_whole_tables_rows(fmt, dtype):
    qt = QuantizedTensor(random_blocks(40, 512, fmt, torch.Generator().manual_seed(3)), fmt, (40, 512))
    table = dequantize_rows(qt, dtype, "cpu")
    emb = QuantEmbedding(qt, dtype)
    ids = torch.tensor([[5, 0, 39], [5, 5, 17]])
    out = emb(ids)
    assert out.dtype == dtype and out.shape == (2, 3, 512)
    assert torch.equal(out, table[ids])
    assert torch.equal(emb.weight, table)
    assert list(emb.state_dict()) == ["weight"] and torch.equal(emb.state_dict()["weight"], table)
    assert emb.to(torch.float16)(ids).dtype == torch.float16          # the model's dtype, through .to()


def test_a_file_with_a_quantized_embedding_loads_into_blocks(tmp_path):
    mg = make_gguf()
    args = mg.model_args(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=512, vocab_size=4096,
                         max_seq_len=256)
    path = tmp_path / "m.gguf"
    mg.write(args, "q4_K_M", path)
    model = load_model(GGUFFile(path))
    emb = model.tok_embeddings
    assert isinstance(emb, QuantEmbedding) and emb.fmt == "q4_K" and getattr(emb, ROUNDED_THROUGH) == "q4_K"
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert not any(tuple(t.shape) == (args.vocab_size, args.dim) for t in floats)    # no float table anywhere
    assert emb.qweight.numel() == args.vocab_size * args.dim // 256 * 144             # the file's q4_K bytes

    # the same model with the float table GGUFFile.read dequantizes
    table = GGUFFile(path).read().state["tok_embeddings.weight"]
    assert torch.equal(model.state_dict()["tok_embeddings.weight"], table)
    reference = load_model(GGUFFile(path))
    reference.register_module("tok_embeddings", nn.Embedding(args.vocab_size, args.dim, _weight=table))

    def greedy(m):
        engine = Engine(m, None, max_rows=2, max_seq_len=64)
        done = engine.generate([[1, 5, 9, 200, 31], [1, 7]], SamplingParams(max_tokens=6, temperature=0,
                                                                             stop_on_eos=False))
        return [(c.tokens, c.logprobs) for c in done]
    assert greedy(model) == greedy(reference)
