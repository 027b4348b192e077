"""``sirocco quantize`` and ``--quantize`` end to end through ``sirocco.cli.main``: the GGUF file holds exactly the
blocks of the quantize-at-load pass, and runs the same greedy tokens."""

import json

import gguf
import pytest
import torch

from sirocco import backends
from sirocco.backends.quant.linear import QuantLinear
from sirocco.cli import main
from sirocco.pretrained import load

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.mark.parametrize("name", ["sirocco-tiny", "sirocco-tiny-moe"])
@pytest.mark.parametrize("fmt,flag", [("q8_0", "int8"), ("q4_0", "int4")])
def test_quantized_gguf_is_the_model_quantized_at_load(tmp_path, capsys, name, fmt, flag):
    out_file = tmp_path / "m.gguf"
    out, _ = run(capsys, "quantize", name, str(out_file), "--type", fmt, "--dtype", "float32", "--json",
                 "--no-progress")
    summary = json.loads(out)
    assert summary["type"] == fmt and summary["bytes_after"] < summary["bytes_before"] / 2
    assert summary["file_bytes"] == out_file.stat().st_size

    expected = load(name)                       # quantize-at-load with the same format
    backends.attach(expected.model, "torch", quantize=flag)
    back = load(str(out_file))
    want, got = expected.model.state_dict(), back.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert isinstance(back.model.output, QuantLinear) and back.model.output.fmt == "q8_0"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out_file).tensors}
    assert types["blk.0.attn_q.weight"] == fmt.upper() and types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "F32"

    gen = ["generate", "--json", "--temperature", "0", "--max-tokens", "12", "--ignore-eos", "--no-progress",
           "The sliding window", "Once upon a time"]
    from_file, _ = run(capsys, *gen, "--model", str(out_file))
    at_load, _ = run(capsys, *gen, "--model", name, "--quantize", flag)
    tokens = [[json.loads(line)["tokens"] for line in o.splitlines()] for o in (from_file, at_load)]
    assert tokens[0] == tokens[1] and all(len(t) == 12 for t in tokens[0])


def test_quantize_refuses_to_overwrite_and_wants_a_gguf_name(tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert main(["quantize", "sirocco-tiny", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", "sirocco-tiny", str(tmp_path / "m.bin"), "--type", "q8_0"]) == 1
    assert ".gguf" in capsys.readouterr().err


def test_quantize_at_load_keeps_embedding_norms_and_router_in_float():
    loaded = load("sirocco-tiny-moe")
    report = backends.attach(loaded.model, "torch", quantize="int4").quantized
    assert report is not None
    m = loaded.model
    assert type(m.tok_embeddings) is torch.nn.Embedding
    assert all(type(layer.feed_forward.gate) is torch.nn.Linear for layer in m.layers.values())
    assert all(isinstance(e.w1, QuantLinear) and e.w1.fmt == "q4_0" for layer in m.layers.values()
               for e in layer.feed_forward.experts)
    assert report.bytes_after < report.bytes_before / 2.5 and report.layers == sum(
        isinstance(x, QuantLinear) for x in m.modules())


@pytest.mark.parametrize("name", ["sirocco-tiny", "sirocco-tiny-moe"])
def test_a_llama_cpp_mix_through_the_cli(tmp_path, capsys, name):
    """``--type Q4_K_M`` (any case) writes the mix's type per tensor, the embedding quantized with it and the
    file type MOSTLY_Q4_K_M; the file generates what ``--quantize q4_k_m`` at load generates."""
    from sirocco.backends.quant.mixes import MixModel, tensor_type
    from sirocco.checkpoint.names import from_gguf_name

    out_file = tmp_path / "m.gguf"
    out, _ = run(capsys, "quantize", name, str(out_file), "--type", "Q4_K_M", "--json", "--no-progress")
    summary = json.loads(out)
    assert (summary["type"], summary["mix"]) == ("q4_K_M", "Q4_K_M")
    reader = gguf.GGUFReader(out_file)
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    model = MixModel.of(load(name).model.args)
    for t in reader.tensors:
        sirocco_name, stacked = from_gguf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))[1 if stacked else 0:]
        want = tensor_type("Q4_K_M", sirocco_name.format(e=0), shape, model)
        assert t.tensor_type.name == (want.upper() if want else "F32"), t.name
    assert summary["embedding_type"] == "q5_0"              # q4_K's fallback: rows of 192 or 160 values

    gen = ["generate", "--json", "--temperature", "0", "--max-tokens", "12", "--ignore-eos", "--no-progress",
           "The sliding window", "Once upon a time"]
    from_file, _ = run(capsys, *gen, "--model", str(out_file))
    at_load, _ = run(capsys, *gen, "--model", name, "--quantize", "q4_k_m")
    tokens = [[json.loads(line)["tokens"] for line in o.splitlines()] for o in (from_file, at_load)]
    assert tokens[0] == tokens[1] and all(len(t) == 12 for t in tokens[0])


def test_bad_mix_names_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "sirocco-tiny", "x.gguf", "--type", "q4_K_S"])
    assert e.value.code == 2
    assert "'q4_K_S' is not a mix; choose one of q8_0, q4_0, q4_K_M" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--quantize", "iq2_xxs", "x"])
    assert e.value.code == 2
    assert "'iq2_xxs' is not a quantization mix; choose one of int8, int4, q8_0" in capsys.readouterr().err
