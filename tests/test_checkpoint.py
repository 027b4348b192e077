"""Checkpoints: sirocco against transformers on the same weights, in both formats; conversion; bad files."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sirocco.checkpoint import load_model, read_state_dict, save_consolidated, save_hf
from sirocco.checkpoint.names import from_hf_name, from_hf_rope, to_hf_name, to_hf_rope
from sirocco.cli import main
from sirocco.config import preset
from sirocco.errors import CheckpointError, ConfigError
from sirocco.model import build_model

from hf_fixtures import hf_logits, save_hf_checkpoint

KINDS = ["mistral", "mixtral"]
LENGTHS = [17, 5, 11]          # longer and shorter than the window 6, so the window matters


def _packed_logits(model, seqs):
    with torch.no_grad():
        return model(torch.cat(seqs), [len(s) for s in seqs]).split([len(s) for s in seqs])


@pytest.fixture(scope="module", params=KINDS)
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_checkpoint(request.param, folder)
    return request.param, folder, model


def test_logits_equal_transformers(hf_checkpoint):
    kind, folder, hf = hf_checkpoint
    model = load_model(folder)
    assert model.args.sliding_window == 6 and (model.args.moe is not None) == (kind == "mixtral")
    seqs = [torch.randint(0, 320, (n,)) for n in LENGTHS]
    for got, toks in zip(_packed_logits(model, seqs), seqs, strict=True):
        torch.testing.assert_close(got, hf_logits(hf, toks), atol=1e-5, rtol=1e-5)


def test_logits_equal_after_conversion_to_consolidated(hf_checkpoint, tmp_path):
    _kind, folder, hf = hf_checkpoint
    assert main(["convert", str(folder), str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "params.json").exists() and (tmp_path / "c" / "consolidated.safetensors").exists()
    model = load_model(tmp_path / "c")
    seqs = [torch.randint(0, 320, (n,)) for n in LENGTHS]
    for got, toks in zip(_packed_logits(model, seqs), seqs, strict=True):
        torch.testing.assert_close(got, hf_logits(hf, toks), atol=1e-5, rtol=1e-5)


def test_round_trip_is_exact(hf_checkpoint, tmp_path):
    _kind, folder, _ = hf_checkpoint
    main(["convert", str(folder), str(tmp_path / "c")])
    main(["convert", str(tmp_path / "c"), str(tmp_path / "h")])
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "h" / "model.safetensors")
    assert original.keys() == back.keys()
    for k in original:
        assert torch.equal(original[k], back[k]), k
    # and the other way: consolidated -> HF -> consolidated
    main(["convert", str(tmp_path / "h"), str(tmp_path / "c2")])
    a = load_file(tmp_path / "c" / "consolidated.safetensors")
    b = load_file(tmp_path / "c2" / "consolidated.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sirocco_written_hf_checkpoint_loads_in_transformers(tmp_path):
    import transformers
    args = preset("tiny-moe", sliding_window=5)
    model = build_model(args, seed=3)
    save_hf(model, args, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()              # sharded
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    toks = torch.randint(0, args.vocab_size, (13,))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, toks), model(toks, [13]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_model(tmp_path).state_dict(), model.state_dict(), atol=0, rtol=0)


def test_sharded_hf_checkpoint(tmp_path):
    hf = save_hf_checkpoint("mistral", tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_model(tmp_path)
    toks = torch.randint(0, 320, (15,))
    with torch.no_grad():
        torch.testing.assert_close(model(toks, [15]), hf_logits(hf, toks), atol=1e-5, rtol=1e-5)


def test_consolidated_pth_is_read_with_weights_only(tmp_path):
    args = preset("tiny")
    model = build_model(args, seed=4)
    save_consolidated(model, args, tmp_path / "st")
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "params.json").write_text((tmp_path / "st" / "params.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pth" / "consolidated.00.pth")
    loaded = load_model(tmp_path / "pth")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


class _NotATensor:
    pass


def test_pth_with_code_is_refused(tmp_path):
    save_consolidated(build_model(preset("tiny")), preset("tiny"), tmp_path)
    (tmp_path / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": _NotATensor()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=re.escape("consolidated.00.pth: cannot read PyTorch checkpoint")):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_applied_while_loading(hf_checkpoint, dtype):
    model = load_model(hf_checkpoint[1], dtype=dtype)                     # read as copies, then cast
    assert {p.dtype for p in model.parameters()} == {dtype}
    full = load_model(hf_checkpoint[1])                                     # memory-mapped as stored
    for k, v in full.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(dtype)), k


def test_stage_reads_only_its_tensors(hf_checkpoint):
    _kind, folder, _ = hf_checkpoint
    full = load_model(folder)
    stage = load_model(folder, layers=[1], embed=False, head=True)
    assert set(stage.state_dict()) == {k for k in full.state_dict() if not k.startswith(("layers.0.", "tok_"))}
    for k, v in stage.state_dict().items():
        assert torch.equal(v, full.state_dict()[k])


# -- the q/k permutation and names ----------------------------------------------------------------------------
@pytest.mark.parametrize("heads,d", [(1, 2), (4, 16), (3, 8), (2, 128)])
def test_qk_permutation_round_trip_and_meaning(heads, d):
    w = torch.randn(heads * d, 5)
    hf = to_hf_rope(w, heads)
    assert torch.equal(from_hf_rope(hf, heads), w)
    # Within each head, HF's first half holds the even rows (first of each rotated pair), the second half the odd.
    for h in range(heads):
        head = w[h * d:(h + 1) * d]
        torch.testing.assert_close(hf[h * d:(h + 1) * d], torch.cat([head[0::2], head[1::2]]), atol=0, rtol=0)


def test_names_round_trip():
    model = build_model(preset("tiny-moe"))
    for name in model.state_dict():
        assert from_hf_name(to_hf_name(name)) == name
    assert to_hf_name("layers.3.feed_forward.experts.2.w1.weight") == \
        "model.layers.3.block_sparse_moe.experts.2.w1.weight"
    assert to_hf_name("layers.0.attention.wq.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_read_state_dict_keeps_stored_dtype(tmp_path):
    args = preset("tiny")
    save_consolidated(build_model(args), args, tmp_path, dtype=torch.bfloat16)
    _, state, layout = read_state_dict(tmp_path)
    assert layout.format == "consolidated" and {t.dtype for t in state.values()} == {torch.bfloat16}


# -- bad checkpoints give clear errors ------------------------------------------------------------------------
@pytest.fixture
def consolidated(tmp_path):
    args = preset("tiny")
    save_consolidated(build_model(args), args, tmp_path)
    return tmp_path


def _edit(folder, fn):
    path = folder / "consolidated.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_missing_tensor_is_named(consolidated):
    _edit(consolidated, lambda s: s.pop("layers.1.attention.wk.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): layers\.1\.attention\.wk\.weight "
                                              r"\(expected shape \[32, 64\]\)"):
        load_model(consolidated)


def test_unexpected_tensor_is_named(consolidated):
    _edit(consolidated, lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): layers\.0\.attention\.bias \[3\]"):
        load_model(consolidated)


def test_wrong_shape_names_key_and_both_shapes(consolidated):
    _edit(consolidated, lambda s: s.update({"layers.0.feed_forward.w1.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=re.escape(
            "layers.0.feed_forward.w1.weight has shape [100, 64] in the file, the config (params.json) needs "
            "[128, 64]")):
        load_model(consolidated)


def test_hf_missing_tensor_uses_hf_names(hf_checkpoint, tmp_path):
    _kind, folder, _ = hf_checkpoint
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight \(expected shape"):
        load_model(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file(consolidated, cut):
    path = consolidated / "consolidated.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: cannot read safetensors file .* truncated"):
        load_model(consolidated)


def test_corrupt_header(consolidated):
    path = consolidated / "consolidated.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load_model(consolidated)


def test_missing_config_field_is_named(consolidated):
    params = json.loads((consolidated / "params.json").read_text())
    del params["n_kv_heads"]
    (consolidated / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="missing required field 'n_kv_heads'"):
        load_model(consolidated)


def test_no_checkpoint_in_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path)


def test_missing_shard_is_named(tmp_path):
    save_hf_checkpoint("mistral", tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are not in the folder: {victim.name}"):
        load_model(tmp_path)


def test_cli_reports_errors_in_one_line(consolidated, tmp_path, capsys):
    _edit(consolidated, lambda s: s.pop("norm.weight"))
    assert main(["convert", str(consolidated), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "missing tensor(s): norm.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()           # nothing half-written


def test_convert_refuses_non_empty_destination(consolidated, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", str(consolidated), str(tmp_path / "out")]) != 0
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
