"""GGUF files of every quantization mix, written by sirocco and read back (backends/quant/convert.py's mixes,
checkpoint/gguf_write.py, gguf_read.py): the file holds, tensor by tensor, the type ``mixes.tensor_type`` gives and
the blocks the model quantized at load runs, byte for byte; read back, it is that model (the same state dict, the
same greedy tokens and log-probabilities); and quantizing while loading gives the bits of quantizing the loaded
model.

Four models: the bundled sirocco-tiny and sirocco-tiny-moe, whose rows (192, 160, 224 values) are no multiple of 256,
so the K types fall back per tensor to the 32-value ones as the mixes say; and two random models whose dims are
multiples of 256, so that every K type and iq4_xs is written and read: a dense one of 4 query heads per kv head
(the Q2_K and IQ4_XS attention-v rules) and a Mixtral of 8 experts (attention-v/k q8_0, attention-output q5_K).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from sirocco import backends
from sirocco.backends.quant.convert import ROUNDED_THROUGH, resolve
from sirocco.backends.quant.linear import QuantLinear, SharedInputProjections
from sirocco.backends.quant.mixes import MIXES, MixModel, tensor_type
from sirocco.checkpoint import GGUFFile, load_model, read_model
from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.checkpoint.names import from_gguf_name
from sirocco.checkpoint.save import save_consolidated
from sirocco.config import ModelArgs, MoeArgs
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams
from sirocco.model import Attention, build_model
from sirocco.pretrained import BUNDLED

pytestmark = pytest.mark.usefixtures("one_thread")

MIX_NAMES = ["q8_0", "q4_0", "q4_K_M", "q5_K_M", "q6_K", "q3_K_M", "q2_K", "iq4_xs"]
TOKENIZER = BUNDLED / "sirocco-tiny" / "tokenizer.model"
RANDOM = {
    "dense256": ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
                          vocab_size=4096, sliding_window=16, max_seq_len=128),
    "mixtral256": ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=256, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                            vocab_size=4096, rope_theta=1e6, max_seq_len=128, moe=MoeArgs(8, 2)),
}
MODELS = ["sirocco-tiny", "sirocco-tiny-moe", *RANDOM]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each model's checkpoint folder: the bundled ones as shipped, the random ones written here in bf16."""
    root = tmp_path_factory.mktemp("mixes")
    out = {name: BUNDLED / name for name in MODELS if name not in RANDOM}
    for name, args in RANDOM.items():
        model = build_model(args, seed=1)
        with torch.no_grad():                  # spread the weights' scales, so that blocks differ in range
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(torch.rand(p.shape[0], 1, generator=torch.Generator().manual_seed(p.numel())) * 2 + 0.1)
        out[name] = save_consolidated(model, args, root / name, dtype=torch.bfloat16)
        (out[name] / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return out


def quantized_at_load(folder, mix):
    """The model quantized while read (what --quantize and sirocco quantize do), and the embedding's blocks."""
    parts = read_model(folder, quantize=mix)
    conversion = backends.attach(parts.model, "torch", quantize=mix, blocks=parts.blocks)
    return parts.model, conversion


def greedy(model):
    engine = Engine(model, None, max_rows=2, max_seq_len=64)
    done = engine.generate([[1, 5, 9, 200, 31], [1, 7]], SamplingParams(max_tokens=8, temperature=0,
                                                                         stop_on_eos=False))
    return [(c.tokens, c.logprobs) for c in done]


def assert_same_state(want, got):
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mix", MIX_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_a_written_mix_reads_back_as_the_model_quantized_at_load(folders, tmp_path, name, mix):
    model, conversion = quantized_at_load(folders[name], mix)
    path = tmp_path / "m.gguf"
    save_gguf(model, path, folders[name] / "tokenizer.model", torch.float32, mix=mix, embedding=conversion.embedding)

    # every tensor in the type of the mix's rule (the router, norms and sirocco's mixes' embedding in F32)
    mix_model = MixModel.of(model.args)
    reader = gguf.GGUFReader(path)
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType[MIXES[resolve(mix)][1]]
    written = set()
    for t in reader.tensors:
        sirocco_name, stacked = from_gguf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))[1 if stacked else 0:]
        want = tensor_type(resolve(mix), sirocco_name.format(e=0), shape, mix_model)
        assert t.tensor_type.name == (want.upper() if want else "F32"), t.name
        written.add(t.tensor_type.name)
    if name in RANDOM and mix not in ("q8_0", "q4_0"):       # the K types themselves, not their fallbacks
        assert MIXES[resolve(mix)][0].upper() in written, written

    back = load_model(GGUFFile(path))
    assert_same_state(model, back)                            # blocks byte for byte, the embedding's values too
    embedding_type = conversion.embedding.fmt if conversion.embedding is not None else None
    assert getattr(back.tok_embeddings, ROUNDED_THROUGH, None) == embedding_type
    assert (embedding_type is None) == (mix in ("q8_0", "q4_0"))
    with torch.inference_mode():
        assert greedy(back) == greedy(model)

    if name in RANDOM and embedding_type is not None:
        # quantizing while loading gives the bits of quantizing the loaded model, embedding blocks included
        loaded = load_model(folders[name])
        expected = backends.attach(loaded, "torch", quantize=mix)
        assert_same_state(loaded, model)
        assert conversion.quantized == expected.quantized and expected.embedding is not None
        assert torch.equal(conversion.embedding.data, expected.embedding.data)
        # and quantizing again leaves it as it is: QuantLinear stays, the embedding is not rounded twice
        assert backends.attach(loaded, "torch", quantize=mix).embedding is None
        assert_same_state(loaded, model)


def test_projections_of_different_types_are_fused_one_call_per_type(folders, monkeypatch):
    """Q4_K_M gives the dense model's layer 1 (a "more bits" layer) wv q6_K beside wq, wk q4_K, and Mixtral's
    wk, wv q8_0: each attention layer still gets one projection kernel, making one qlinear_many call per type,
    each output the bits of its QuantLinear alone."""
    from sirocco.backends.quant import kernels as qk
    for name, calls_per_layer in (("dense256", [1, 2]), ("mixtral256", [2, 2])):
        model, _ = quantized_at_load(folders[name], "q4_K_M")
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        assert all(isinstance(m.projection_kernel, SharedInputProjections) for m in attention)
        for layer, expected_calls in zip(attention, calls_per_layer, strict=True):
            kinds = [layer.wq.fmt, layer.wk.fmt, layer.wv.fmt]
            assert len(set(kinds)) == expected_calls, kinds
            calls = []
            many = qk.qlinear_many
            # bound now: were the kernel missing, the skip below would leave this layer's patch in place for the next
            monkeypatch.setattr(qk, "qlinear_many",
                                lambda x, ws, fmt, calls=calls, many=many, **kw: calls.append(fmt) or many(x, ws, fmt,
                                                                                                         **kw))
            with torch.inference_mode():
                x = torch.randn(3, layer.wq.in_features)
                fused = layer.projection_kernel(x)
                if fused is None:
                    assert not qk.kernel_available()
                    continue
                assert sorted(calls) == sorted(set(kinds))
                for y, linear in zip(fused, (layer.wq, layer.wk, layer.wv), strict=True):
                    assert isinstance(linear, QuantLinear) and torch.equal(y, linear(x))
            monkeypatch.undo()


PEAK_SCRIPT = """
import json, sys, torch
from pathlib import Path
from sirocco.backends.quant.convert import model_bytes
from sirocco.checkpoint import load_quantized

def kib(key):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
Path("/proc/self/clear_refs").write_text("5")          # VmHWM back to the resident size
rss = kib("VmRSS:")
model, _ = load_quantized(sys.argv[1], sys.argv[2], dtype=torch.bfloat16, progress=False)
print(json.dumps({"peak": (kib("VmHWM:") - rss) * 1024, "bytes": model_bytes(model)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak through /proc")
def test_quantizing_a_mix_while_loading_grows_the_peak_by_the_quantized_bytes_only(tmp_path):
    """Quantizing to q4_K_M while loading (bf16 checkpoints of 1 and 5 layers, each in a fresh process): the load's
    peak memory grows with the model by its quantized bytes, not by its float ones (the float model never exists
    whole). What the peak holds besides the model is the quantizers' working memory, the same for any size; how
    much of it is in flight at the peak varies from run to run with the host's load (about +-10 MiB), so each size
    is loaded twice and the lower peak taken, and the sizes differ by four layers for the growth to stand above it."""
    peaks = {}
    for n in (1, 5):
        args = ModelArgs(dim=1024, n_layers=n, head_dim=128, hidden_dim=2048, n_heads=8, n_kv_heads=2,
                         norm_eps=1e-5, vocab_size=1024, max_seq_len=256)
        folder = save_consolidated(build_model(args, seed=0), args, tmp_path / f"l{n}", dtype=torch.bfloat16)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), "q4_K_M"], capture_output=True,
                                 text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            runs.append(json.loads(out.stdout.splitlines()[-1]))
        peaks[n] = min(runs, key=lambda r: r["peak"])
    grown = peaks[5]["peak"] - peaks[1]["peak"]
    quantized = peaks[5]["bytes"] - peaks[1]["bytes"]
    floats = 4 * 8.4e6 * 2                      # four layers' bf16 weights: 8.4M parameters each
    print(f"peak grows by {grown / 2**20:.1f} MiB for {quantized / 2**20:.1f} MiB of quantized layers "
          f"({floats / 2**20:.1f} MiB in bf16); the 1-layer load peaks at {peaks[1]['peak'] / 2**20:.1f} MiB")
    assert grown < 1.25 * quantized + 8 * 2**20 and grown < 0.5 * floats
