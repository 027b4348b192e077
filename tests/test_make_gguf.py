"""benchmarks/make_gguf.py: a GGUF file of a model shape with random weights written directly in a quantization mix,
tensor by tensor. The file holds, tensor by tensor, the type ``mixes.tensor_type`` gives; sirocco loads it and
generates finite logits; the weights' spread is about the one asked; and the memory writing takes grows with the
largest tensor, not with the file."""
import importlib.util
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import pytest
import torch

from sirocco.backends.quant.layouts import dequantize
from sirocco.backends.quant.mixes import MixModel, tensor_type
from sirocco.checkpoint import GGUFFile, load_model
from sirocco.checkpoint.gguf_read import QUANT_FORMATS
from sirocco.checkpoint.names import from_gguf_name
from sirocco.generate.engine import Engine
from sirocco.generate.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_gguf.py"
_spec = importlib.util.spec_from_file_location("make_gguf", SCRIPT)
assert _spec is not None and _spec.loader is not None
make_gguf = importlib.util.module_from_spec(_spec)
sys.modules["make_gguf"] = make_gguf              # dataclasses look their module up there
_spec.loader.exec_module(make_gguf)

DENSE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=512, vocab_size=4096, max_seq_len=256)
MOE = dict(DENSE, n_kv_heads=2, hidden_dim=256, experts=8, experts_used=2)


def sirocco_name(gguf_name: str) -> str:
    """The sirocco name ``tensor_type`` takes for a GGUF tensor (a stack's first expert's)."""
    known = from_gguf_name(gguf_name)
    assert known is not None, gguf_name
    template, stacked = known
    return template.format(e=0) if stacked else template


@pytest.mark.parametrize("shape,mix", [(DENSE, "q4_K_M"), (DENSE, "q2_K"), (MOE, "q2_K"), (MOE, "q3_K_M")],
                         ids=["dense-q4_K_M", "dense-q2_K", "moe-q2_K", "moe-q3_K_M"])
def test_file_types_load_and_finite_logits(tmp_path, shape, mix):
    args = make_gguf.model_args(**shape)
    path = tmp_path / "m.gguf"
    summary = make_gguf.write(args, mix, path)
    assert summary["file_bytes"] == path.stat().st_size > summary["tensor_bytes"]
    model = MixModel.of(args)
    reader = gguf.GGUFReader(str(path))
    seen = 0
    for t in reader.tensors:
        shape_nk = tuple(int(s) for s in reversed(t.shape.tolist()))        # GGUF lists dims innermost first
        want = tensor_type(mix, sirocco_name(t.name), shape_nk[-2:], model)
        got = t.tensor_type.name
        if want is None:
            assert got == "F32", t.name                                      # norms, the router (K fits blocks)
        else:
            assert got == want.upper(), (t.name, got, want)
            seen += 1
    assert seen == 2 + args.n_layers * 7              # embedding, head, 4 attention + 3 feed-forward per layer
    field = reader.get_field("general.file_type")
    assert field is not None and field.contents() == gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]

    m = load_model(GGUFFile(path))
    assert m.args.dim == args.dim and (m.args.moe is None) == (args.moe is None)
    engine = Engine(m, None, max_rows=2, max_seq_len=64)
    done = engine.generate([[1, 5, 9, 200, 31], [1, 7]], SamplingParams(max_tokens=4, temperature=0,
                                                                         stop_on_eos=False))
    for c in done:
        assert len(c.tokens) == 4 and all(torch.isfinite(torch.tensor(c.logprobs)))


def test_weights_spread_is_the_one_asked(tmp_path):
    """Every quantized tensor's values are finite with a standard deviation near --std, whatever its type."""
    args = make_gguf.model_args(**DENSE)
    path = tmp_path / "m.gguf"
    make_gguf.write(args, "q3_K_M", path, std=0.01)
    types = set()
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        fmt = QUANT_FORMATS[t.tensor_type.name]
        w = dequantize(torch.from_numpy(t.data.copy()), fmt)
        types.add(fmt)
        assert torch.isfinite(w).all(), t.name
        assert 0.005 < float(w.std()) < 0.02, (t.name, fmt, float(w.std()))
    assert {"q3_K", "q4_K", "q5_K", "q6_K"} <= types


def test_memory_grows_with_the_largest_tensor_not_the_file(tmp_path):
    """Twelve times the layers make a file over four times larger; the peak of the memory the writer allocates
    (traced: numpy's arrays and Python's objects) stays about the same, bounded by a few of the largest tensors."""
    peaks, sizes = [], []
    for layers in (1, 12):
        args = make_gguf.model_args(**dict(DENSE, n_layers=layers, hidden_dim=2048))
        make_gguf.write(args, "q4_K_M", tmp_path / "warm.gguf")          # imports and tables, outside the trace
        tracemalloc.start()
        summary = make_gguf.write(args, "q4_K_M", tmp_path / f"m{layers}.gguf")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks.append(peak)
        sizes.append(summary["file_bytes"])
        assert peak < 4 * summary["largest_tensor_bytes"] + 2_000_000, (peak, summary)
    assert sizes[1] > 4 * sizes[0]
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_cli_presets_and_errors(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dim", "256", "--layers", "1", "--heads", "4", "--kv-heads",
                          "1", "--hidden", "512", "--vocab", "4096", "--mix", "q6_K", "--out",
                          str(tmp_path / "a.gguf")],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["mix"] == "Q6_K" and summary["tensors"]["Q6_K"] == 2 + 7
    bad = subprocess.run([sys.executable, str(SCRIPT), "--shape", "1b", "--mix", "q9_X", "--out",
                          str(tmp_path / "b.gguf")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown quantization mix 'q9_X'" in bad.stderr
    assert not (tmp_path / "b.gguf").exists()
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dim", "256", "--mix", "q6_K", "--out",
                          str(tmp_path / "c.gguf")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing hidden_dim, n_heads, n_kv_heads, n_layers, vocab_size" in bad.stderr
    assert make_gguf.SHAPES["mixtral-8x7b"]["experts"] == 8 and make_gguf.SHAPES["1b"]["dim"] == 2048


def test_big_gguf_benchmark_bytes_per_token(tmp_path):
    """bench_big_gguf.py's bound counts what a decode step reads: every tensor, used/count of each stack of experts,
    one row of the embedding."""
    spec = importlib.util.spec_from_file_location("bench_big_gguf", SCRIPT.with_name("bench_big_gguf.py"))
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_big_gguf"] = bench
    spec.loader.exec_module(bench)
    args = make_gguf.model_args(**MOE)
    path = tmp_path / "m.gguf"
    make_gguf.write(args, "q2_K", path)
    tensors = gguf.GGUFReader(str(path)).tensors
    sizes = {t.name: int(t.n_bytes) for t in tensors}
    experts = sum(n for name, n in sizes.items() if name.endswith("_exps.weight"))
    embedding = sizes["token_embd.weight"]
    got = bench.decode_bytes(path)
    assert got["expert_bytes_per_token"] == pytest.approx(experts * 2 / 8)
    assert got["bytes_per_token"] == pytest.approx(sum(sizes.values()) - experts * 6 / 8 - embedding
                                                   + embedding / args.vocab_size)
