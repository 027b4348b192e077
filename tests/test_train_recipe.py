"""Recipes: bundled ones parse, every mistake names its field, flags override; the train command end to end,
fine-tuning from both published checkpoint formats."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from sirocco.checkpoint import load_model, save_hf
from sirocco.cli import build_parser, main
from sirocco.cli.train import build_recipe
from sirocco.train.recipe import RECIPES, Recipe, RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny models: see conftest.py


def test_bundled_recipes_parse_and_build_their_models():
    names = sorted(p.stem for p in RECIPES.glob("*.toml"))
    assert names == ["sirocco-tiny", "sirocco-tiny-moe"]
    dense = Recipe.load("sirocco-tiny").model_args(4096)
    moe = Recipe.load("sirocco-tiny-moe").model_args(4096)
    assert dense.moe is None and dense.sliding_window < Recipe.load("sirocco-tiny").data.seq_len
    assert moe.moe.num_experts in (4, 8) and moe.moe.num_experts_per_tok == 2 and moe.sliding_window is None
    assert Recipe.load("sirocco-tiny-moe").train.aux_loss_coef == 0.02
    assert 2 * (dense.num_parameters() + moe.num_parameters()) < 16e6       # bf16 weights within 16 MB


@pytest.mark.parametrize("raw, message", [
    ({"train": {"stepz": 3}}, r"\[train\] unknown field 'stepz'"),
    ({"train": {"steps": "many"}}, r"\[train\] steps: expected an integer, got 'many'"),
    ({"train": {"lr": True}}, r"\[train\] lr: expected a number, got True"),
    ({"train": {"steps": 0}}, r"\[train\] steps must be at least 1, got 0"),
    ({"train": {"autocast": "fp8"}}, r"\[train\] autocast must be 'auto', 'bf16' or 'off'"),
    ({"data": {"val_fraction": 1.5}}, r"\[data\] val_fraction must be in \[0, 1\)"),
    ({"tokenizer": {"vocab_size": 100}}, r"\[tokenizer\] vocab_size must be at least 260"),
    ({"optimizer": {"lr": 1.0}}, r"unknown section or field 'optimizer'"),
    ({"train": 3}, r"\[train\] must be a table"),
    ({"seed": 1.5}, r"seed: expected an integer"),
])
def test_recipe_errors_name_the_field(raw, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(raw, source="r.toml")


def test_model_section_errors_name_the_field():
    r = Recipe.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}})
    with pytest.raises(RecipeError, match=r"\[model\] n_kv_heads: missing"):
        r.model_args(300)
    r.model.n_kv_heads = 3
    with pytest.raises(RecipeError, match=r"\[model\] n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        r.model_args(300)
    r = Recipe.from_dict({"model": {"preset": "tiny", "num_experts": 4}})
    args = r.model_args(300)
    assert args.moe.num_experts == 4 and args.vocab_size == 300 and args.dim == 64


def test_recipe_file_round_trips_through_toml(tmp_path):
    r = Recipe.load("sirocco-tiny-moe")
    (tmp_path / "r.toml").write_text(r.to_toml())
    assert Recipe.load(str(tmp_path / "r.toml")) == r
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3")
    with pytest.raises(RecipeError, match=re.escape("bad.toml")):
        Recipe.load(str(tmp_path / "bad.toml"))
    with pytest.raises(RecipeError, match="not a bundled recipe"):
        Recipe.load("no-such-recipe")


def test_flags_override_the_recipe():
    args = build_parser().parse_args(["train", "--recipe", "sirocco-tiny", "--out", "x", "--steps", "7", "--lr",
                                      "1e-4", "--set", "model.sliding_window=32", "--set", "data.corpus=./my docs",
                                      "--seed", "5"])
    r = build_recipe(args)
    assert (r.train.steps, r.train.lr, r.model.sliding_window, r.data.corpus, r.seed) == \
        (7, 1e-4, 32, "./my docs", 5)
    bad = build_parser().parse_args(["train", "--out", "x", "--set", "train.steps=-1"])
    with pytest.raises(RecipeError, match=r"\[train\] steps must be at least 1, got -1"):
        build_recipe(bad)
    with pytest.raises(RecipeError, match=re.escape("expected SECTION.FIELD=VALUE")):
        build_recipe(build_parser().parse_args(["train", "--out", "x", "--set", "steps"]))


DOCS = ["The sliding window limits attention to the last W tokens of a sequence, counting the query itself.",
        "A rolling buffer cache stores the key of position p at slot p mod W of its sequence's row.",
        "Mixtral routes each token to two of eight experts and adds their outputs, weighted by the router.",
        "Packed sequences hold several documents back to back; the mask keeps each one to itself."] * 3


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i, text in enumerate(DOCS):
        (d / f"{i:02d}.txt").write_text(f"{text} (note {i})")
    return d


def tiny_flags(folder, out):
    return ["train", "--out", str(out), "--corpus", str(folder), "--vocab-size", "320", "--seq-len", "32",
            "--steps", "4", "--batch-rows", "2", "--set", "model.preset=tiny", "--set", "model.max_seq_len=64",
            "--set", "train.warmup=1", "--set", "train.eval_every=2", "--set", "data.val_fraction=0.25",
            "--no-progress", "--json"]


def test_train_command_writes_a_loadable_model_and_fine_tunes_both_formats(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_flags(folder, out) + ["--export", str(tmp_path / "export")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["val_loss"] > 0 and summary["tokens_per_s"] > 0
    for name in ("params.json", "consolidated.safetensors", "tokenizer.model", "recipe.toml", "loss.png",
                 "optimizer.pt", "trainer_state.json"):
        assert (out / name).is_file(), name
    exported = load_file(tmp_path / "export" / "consolidated.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    trained = load_model(out)

    # fine-tune: from the consolidated folder, and from the same weights in Hugging Face's format
    hf = tmp_path / "hf"
    save_hf(trained, trained.args, hf)
    (hf / "tokenizer.model").write_bytes((out / "tokenizer.model").read_bytes())
    finals = []
    for source in (out, hf):
        ft = tmp_path / f"ft-{source.name}"
        flags = ["train", "--init", str(source), "--out", str(ft), "--corpus", str(folder), "--seq-len", "32",
                 "--steps", "2", "--batch-rows", "2", "--lr", "1e-3", "--set", "train.warmup=1", "--no-progress",
                 "--json"]
        assert main(flags) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == 2
        assert json.loads((ft / "params.json").read_text()) == json.loads((out / "params.json").read_text())
        finals.append(load_file(ft / "consolidated.safetensors"))
    start = load_file(out / "consolidated.safetensors")
    for k in start:
        assert not torch.equal(finals[0][k], start[k]) or k.endswith("norm.weight")
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-5, rtol=1e-4)   # same start, same run

    # a finished run is not overwritten; --resume continues it and extends the schedule
    assert main(tiny_flags(folder, out)) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6
